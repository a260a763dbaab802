"""Reference-only control: sd-webui-controlnet's weight-free style transfer from an image.

Before each U-Net call the reference image's latent, noised to the call's timestep, goes
through the plain U-Net once ("write"): every transformer block records its normalised input
(attention sharing, `reference_only`) and some blocks record their output's per-channel mean
and variance (AdaIN, `reference_adain`). In the real call ("read") each block's self-attention
also attends to the recorded features, and the recorded statistics replace the block outputs'.
Uncond rows are blended back towards the plain result by the style fidelity (the extension's
threshold_a): out = f·(plain on uncond rows, reference elsewhere) + (1 − f)·reference.

Which blocks take part depends on the unit weight as in the extension: transformer blocks
sorted widest first take part while i/N < weight; AdaIN blocks (middle 0, input blocks
1 − k/n, output blocks k/n, all doubled) while their number < weight.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .attention import BasicTransformerBlock

MODULES = ("reference_only", "reference_adain", "reference_adain+attn")
EPS = 1e-6


@dataclass
class ActiveReference:
    """One reference unit in a pass: the reference latent [1, C, h, w] and its rules."""
    latent: torch.Tensor
    module: str
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    fidelity: float = 0.5  # already adjusted for control mode, hires and SDXL

    @property
    def attention(self) -> bool:
        return self.module in ("reference_only", "reference_adain+attn")

    @property
    def adain(self) -> bool:
        return self.module in ("reference_adain", "reference_adain+attn")


def style_fidelity(threshold_a: float, control_mode: int, hires: bool, sdxl: bool) -> float:
    """The extension's current_style_fidelity: threshold_a in [0, 1], cubed for SDXL; 1 for
    "ControlNet is more important", 0 for "My prompt is more important" and in the hires pass."""
    f = max(0.0, min(1.0, float(threshold_a)))
    if sdxl:
        f = f ** 3.0
    if control_mode == 2:
        return 1.0
    if control_mode == 1 or hires:
        return 0.0
    return f


class _Call:
    """What the blocks share during one U-Net call."""

    def __init__(self):
        self.mode: str | None = None  # "write" or "read"
        self.attention = self.adain = False  # what the unit being written records
        self.weight = 1.0
        self.fidelity = 0.0
        self.uc: list[int] = []


class _Bank:
    def __init__(self):
        self.items: list = []
        self.fidelities: list[float] = []

    def take(self) -> tuple[list, float]:
        items, f = self.items, sum(self.fidelities) / max(len(self.fidelities), 1)
        self.items, self.fidelities = [], []
        return items, f


def _blend(ref: torch.Tensor, plain_uc: Callable[[list[int]], torch.Tensor],
           call: _Call, fidelity: float) -> torch.Tensor:
    """f·(ref with the uncond rows made plain) + (1 − f)·ref."""
    if not call.uc or fidelity <= 1e-5:
        return ref
    c = ref.clone()
    c[call.uc] = plain_uc(call.uc).to(c.dtype)
    return fidelity * c + (1.0 - fidelity) * ref


class AttentionShare:
    """Set as BasicTransformerBlock.reference: its self-attention in write/read mode."""

    def __init__(self, call: _Call, order: float):
        self.call, self.order, self.bank = call, order, _Bank()

    def self_attention(self, attn: nn.Module, h: torch.Tensor) -> torch.Tensor:
        call = self.call
        if call.mode == "write":
            if call.attention and call.weight > self.order:
                self.bank.items.append(h.detach().clone())
                self.bank.fidelities.append(call.fidelity)
            return attn(h)
        bank, f = self.bank.take()
        if call.mode != "read" or not bank:
            return attn(h)
        ref = attn(h, torch.cat([h, *bank], dim=1))
        return _blend(ref, lambda rows: attn(h[rows]), call, f)


class AdaIN:
    """A forward hook on a U-Net block: records or imposes per-channel mean and variance."""

    def __init__(self, call: _Call, order: float):
        self.call, self.order, self.bank = call, order, _Bank()

    def __call__(self, _module, _args, x: torch.Tensor) -> torch.Tensor | None:
        call = self.call
        if call.mode == "write":
            if call.adain and call.weight > self.order:
                var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
                self.bank.items.append((mean, var))
                self.bank.fidelities.append(call.fidelity)
            return None
        bank, f = self.bank.take()
        if call.mode != "read" or not bank:
            return None
        var, mean = torch.var_mean(x, dim=(2, 3), keepdim=True, correction=0)
        std = var.clamp(min=EPS) ** 0.5
        mean_acc = sum(m for m, _ in bank) / len(bank)
        std_acc = (sum(v for _, v in bank) / len(bank)).clamp(min=EPS) ** 0.5
        ref = (x - mean) / std * std_acc + mean_acc
        return _blend(ref, lambda rows: x[rows], call, f).to(x.dtype)


def transformer_blocks(unet: nn.Module) -> list[BasicTransformerBlock]:
    """The U-Net's transformer blocks, widest first (stable within a width: model order)."""
    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    return sorted(blocks, key=lambda b: -b.norm1.normalized_shape[0])


def adain_blocks(unet: nn.Module, sdxl: bool) -> list[tuple[nn.Module, float]]:
    """(block, order) of the blocks whose outputs AdaIN adjusts, as the extension picks them."""
    ins = [4, 5, 7, 8] if sdxl else [4, 5, 7, 8, 10, 11]
    outs = list(range(6 if sdxl else 8))
    picked = [(unet.middle_block, 0.0)]
    picked += [(unet.input_blocks[i], 1.0 - k / len(ins)) for k, i in enumerate(ins)
               if i < len(unet.input_blocks)]
    picked += [(unet.output_blocks[i], k / len(outs)) for k, i in enumerate(outs)
               if i < len(unet.output_blocks)]
    return [(m, 2 * w) for m, w in picked]


class ReferenceModel(nn.Module):
    """A denoiser model (`inner`: plain, controlled or both) with reference units: the write
    passes run `plain` (the U-Net without ControlNet residuals, as the extension's original
    forward), the read pass runs `inner`."""

    def __init__(self, inner: nn.Module, plain: nn.Module, unet: nn.Module,
                 units: Sequence[ActiveReference], fraction: Callable[[], float],
                 alphas_cumprod: torch.Tensor, generator: torch.Generator, pass_mark: bool,
                 sdxl: bool):
        super().__init__()
        self.inner, self.plain, self.unet = inner, plain, unet
        self.units, self.fraction, self.pass_mark = list(units), fraction, pass_mark
        self.ac = alphas_cumprod.float()
        self.generator, self.sdxl = generator, sdxl

    def forward(self, x, t, context, cond_mark=None, **kw):
        outer = dict(kw, cond_mark=cond_mark) if self.pass_mark else kw
        frac = self.fraction()
        live = [u for u in self.units
                if u.weight > 0 and u.guidance_start <= frac <= u.guidance_end]
        if not live:
            return self.inner(x, t, context, **outer)
        call = _Call()
        blocks = transformer_blocks(self.unet)
        for i, b in enumerate(blocks):
            b.reference = AttentionShare(call, i / len(blocks))
        hooks = [m.register_forward_hook(AdaIN(call, w))
                 for m, w in adain_blocks(self.unet, self.sdxl)]
        if cond_mark is not None:
            call.uc = [i for i, m in enumerate(cond_mark.tolist()) if m < 0.5]
        try:
            ac = self.ac.to(x.device)[t.float().round().long().clamp(0, len(self.ac) - 1)]
            ac = ac.view(-1, 1, 1, 1)
            for u in live:
                call.mode, call.weight, call.fidelity = "write", u.weight, u.fidelity
                call.attention, call.adain = u.attention, u.adain
                z = u.latent.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
                eps = torch.randn(z.shape, generator=self.generator).to(x.device, x.dtype)
                ref_x = ac.sqrt().to(x.dtype) * z + (1 - ac).sqrt().to(x.dtype) * eps
                ref_kw = dict(kw)
                if kw.get("c_concat") is not None:  # inpainting U-Nets: empty mask, the latent
                    ref_kw["c_concat"] = torch.cat([torch.zeros_like(z[:, :1]), z], dim=1)
                self.plain(ref_x, t, context, **ref_kw)
            call.mode = "read"
            return self.inner(x, t, context, **outer)
        finally:
            for b in blocks:
                b.reference = None
            for h in hooks:
                h.remove()
