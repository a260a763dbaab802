"""ControlNet for the U-Net family: its files (original `control_model.*`, bare, or diffusers
`ControlNetModel` names), its config from shapes, the check against the loaded U-Net, and the
denoiser model that adds the units' residuals (A1111's sd-webui-controlnet `hook.py` rules).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..config import UNetConfig
from ..errors import ModelFileError, SdloomError
from ..models.controlnet import ControlNet, ControlNetConfig
from .base import DetectionError, Shapes, indices, need
from .keymaps.unet import unet_diffusers_to_ldm
from .sd_detect import detect_unet

PREFIX = "control_model."
HINT = "input_hint_block."
WHAT = "ControlNet"
# diffusers `ControlNetModel` names of the parts the U-Net does not have → original names
DIFFUSERS_HINT = {"controlnet_cond_embedding.conv_in": "input_hint_block.0",
                  **{f"controlnet_cond_embedding.blocks.{i}": f"input_hint_block.{2 * i + 2}"
                     for i in range(6)},
                  "controlnet_cond_embedding.conv_out": "input_hint_block.14",
                  "controlnet_mid_block": "middle_block_out.0"}


def _family_name(u: UNetConfig) -> str:
    if u.adm_in_channels is not None:
        return f"SDXL (context {u.context_dim}, ADM {u.adm_in_channels})"
    return {768: "SD1.x", 1024: "SD2.x"}.get(u.context_dim, "an SD U-Net") + \
        f" (context {u.context_dim})"


def _diffusers_table_config(shapes: Shapes) -> UNetConfig:
    """A config that fixes diffusers' block names (levels, blocks per level, which have
    attention) — all the key table needs; the real one is read from the renamed shapes."""
    levels = indices(shapes, "down_blocks.")
    if not levels:
        raise DetectionError("not a diffusers ControlNet: no down_blocks.*")
    nrb = len(indices(shapes, "down_blocks.0.resnets."))
    depth = tuple(int(any(k.startswith(f"down_blocks.{lv}.attentions.") for k in shapes))
                  for lv in levels)
    mid = int(any(k.startswith("mid_block.attentions.") for k in shapes))
    return UNetConfig(channel_mult=(1,) * len(levels), num_res_blocks=max(nrb, 1),
                      transformer_depth=depth, transformer_depth_middle=mid)


def controlnet_keys(shapes: Shapes) -> dict[str, str]:
    """File key → ControlNet module key, for the original layout (with or without the
    `control_model.` prefix; a whole ControlLDM checkpoint gives only its ControlNet) and the
    diffusers layout. Other keys of the file are left out."""
    if any(k.startswith(PREFIX + HINT) for k in shapes):
        return {k: k[len(PREFIX):] for k in shapes if k.startswith(PREFIX)}
    if any(k.startswith(HINT) for k in shapes):
        return {k: k for k in shapes}
    if any(k.startswith("controlnet_cond_embedding.") for k in shapes):
        out, rest = {}, {}
        for k in shapes:
            for d, o in DIFFUSERS_HINT.items():
                if k.startswith(d + "."):
                    out[k] = o + k[len(d):]
                    break
            else:
                if k.startswith("controlnet_down_blocks."):
                    n, tail = k[len("controlnet_down_blocks."):].split(".", 1)
                    out[k] = f"zero_convs.{n}.0.{tail}"
                else:
                    rest[k] = k
        renamed = unet_diffusers_to_ldm(rest, _diffusers_table_config(shapes))
        out.update({old: new for old, new in zip(rest, renamed)})
        return out
    if any(k.startswith(("lora_controlnet", "adapter.", "body.")) for k in shapes) or \
            any(".lora_" in k or "lora_up" in k for k in shapes):
        raise DetectionError("not a ControlNet this sdloom runs: control-LoRA and T2I-Adapter "
                             "files are not supported yet")
    raise DetectionError(f"not a ControlNet: no {PREFIX}{HINT}*, {HINT}* or "
                         "controlnet_cond_embedding.* tensors")


def detect_controlnet(shapes: Shapes) -> ControlNetConfig:
    """The config of a ControlNet from names and shapes (module keys, `controlnet_keys`)."""
    hint_ch = need(shapes, HINT + "0.weight", WHAT, 4)[1]
    in_ch, mc = need(shapes, "input_blocks.0.0.weight", WHAT, 4)[1], \
        need(shapes, "input_blocks.0.0.weight", WHAT, 4)[0]
    # the U-Net detection reads everything but the output conv, which a ControlNet lacks
    unet = detect_unet({**shapes, "out.2.weight": (in_ch, mc, 3, 3)}, prefix="")
    return ControlNetConfig(unet, hint_ch)


def fit_to_unet(cfg: ControlNetConfig, base: UNetConfig, latent_channels: int,
                name: str) -> ControlNetConfig:
    """The ControlNet's config with the base U-Net's head and group conventions (shapes cannot
    tell them); a ControlNet made for another family or width is refused in one line."""
    u = cfg.unet
    problems = [f"{label} {a} ≠ {b}" for label, a, b in (
        ("context width", u.context_dim, base.context_dim),
        ("channels", u.model_channels, base.model_channels),
        ("channel multipliers", u.channel_mult, base.channel_mult),
        ("blocks per level", u.num_res_blocks, base.num_res_blocks),
        ("ADM width", u.adm_in_channels, base.adm_in_channels),
        ("input channels", u.in_channels, latent_channels)) if a != b]
    if problems:
        raise SdloomError(f"ControlNet {name} is for {_family_name(u)} U-Nets of "
                          f"{u.model_channels} channels, the loaded model is "
                          f"{_family_name(base)} with {base.model_channels} "
                          f"({'; '.join(problems)}): choose a ControlNet made for this model")
    fields = {f: getattr(base, f) for f in ("num_heads", "num_head_channels", "num_groups")}
    return dataclasses.replace(cfg, unet=dataclasses.replace(u, **fields))


def build_controlnet(cfg: ControlNetConfig, tensors: dict[str, torch.Tensor],
                     dtype: torch.dtype, device: torch.device) -> ControlNet:
    """The ControlNet with these module-keyed tensors, strictly: missing, unexpected and
    mis-shaped keys are listed."""
    with torch.device("meta"):
        net = ControlNet(cfg)
    want = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    missing = sorted(set(want) - set(tensors))
    unexpected = sorted(set(tensors) - set(want))
    shaped = sorted(k for k in set(want) & set(tensors) if tuple(tensors[k].shape) != want[k])
    if missing or unexpected or shaped:
        parts = [f"{what}: {', '.join(ks[:5])}{' …' if len(ks) > 5 else ''}"
                 for what, ks in (("missing", missing), ("unexpected", unexpected),
                                  ("wrong shape", shaped)) if ks]
        raise ModelFileError(f"ControlNet file does not fit its detected config ({'; '.join(parts)})")
    net.load_state_dict({k: v.to(device, dtype) for k, v in tensors.items()}, assign=True)
    return net.eval().requires_grad_(False)


# ---------------------------------------------------------------- running

MODES = ("Balanced", "My prompt is more important", "ControlNet is more important")


def soft_scales(n: int) -> list[float]:
    """sd-webui-controlnet's soft injection: residual i scaled by 0.825**(12 − i) (i from 0,
    the middle block's last); its list has 13 entries, zipped with the residuals, so SDXL's 10
    take the first 10."""
    return [0.825 ** float(12 - i) for i in range(13)][:n]


@dataclass
class ControlClock:
    """A1111's `state.sampling_step / state.sampling_steps`, which the extension's guidance
    schedule reads: the index of the last finished sampler step (0 at launch, set by the
    sampler callback), over the pass's sampler steps."""
    step: int = 0
    steps: int = 1
    hires: bool = False

    @property
    def fraction(self) -> float:
        return self.step / max(self.steps, 1)


@dataclass
class ActiveControl:
    """One unit ready for one pass: its ControlNet, hint [1, C, H, W] in [0, 1] and rules."""
    net: ControlNet
    hint: torch.Tensor
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    mode: int = 0  # index in MODES
    soft_in_hires: bool = False  # canny/mlsd: the extension forces soft weights in hires fix


class ControlSet:
    """The units of a pass: `residuals(...)` sums their scaled residuals (None if none act)."""

    def __init__(self, units: Sequence[ActiveControl], clock: ControlClock):
        self.units, self.clock = list(units), clock

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                  y: torch.Tensor | None, cond_mark: torch.Tensor | None
                  ) -> list[torch.Tensor] | None:
        total = None
        frac = self.clock.fraction
        for u in self.units:
            if frac < u.guidance_start or frac > u.guidance_end:  # extension: guidance_stopped
                continue
            hint = u.hint.to(x.device).expand(x.shape[0], -1, -1, -1)
            res = u.net(x, hint, t, context, y)
            scales = [u.weight] * len(res)
            if u.mode == 2 and cond_mark is not None:  # uncond rows get no control
                m = cond_mark.to(res[0].device, res[0].dtype).view(-1, 1, 1, 1)
                res = [r * m for r in res]
            if u.mode != 0 or (self.clock.hires and u.soft_in_hires):
                scales = [u.weight * s for s in soft_scales(len(res))]
            res = [r * s for r, s in zip(res, scales)]
            total = res if total is None else [a + b for a, b in zip(total, res)]
        return total


class ControlledUNet(nn.Module):
    """The family's denoiser model (UNetAdapter's inputs) with ControlNet residuals: the
    ControlNet sees the latent without inpainting's extra channels, as the extension does."""

    def __init__(self, unet: nn.Module, control: ControlSet):
        super().__init__()
        self.unet, self.control = unet, control

    def forward(self, x, t, context, y=None, c_concat=None, cond_mark=None):
        res = self.control.residuals(x, t, context, y, cond_mark)
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        return self.unet(x, t, context, y=y, control=res)
