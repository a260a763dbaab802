"""LoRA (Hu et al. 2021) files in kohya/A1111 naming, merged into the weights and reversible.

Key names: `lora_unet_<path>` with the U-Net path in diffusers names (SD1/SD2 kohya files) or
original SGM names (SDXL kohya files), `lora_te_` / `lora_te1_` / `lora_te2_` + transformers
CLIP names. Each module has `.lora_down.weight` [r, in(, k, k)], `.lora_up.weight` [out, r(, 1, 1)]
and an optional `.alpha` (scale = alpha / r). The same names are what `sdloom train` writes.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError, SdloomError

LORA_IN_PROMPT = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")

# OpenCLIP keeps q, k, v in one in_proj matrix: (hf name, openclip name, row slice index)
_OPENCLIP = [("self_attn.q_proj", "attn.in_proj", 0), ("self_attn.k_proj", "attn.in_proj", 1),
             ("self_attn.v_proj", "attn.in_proj", 2), ("self_attn.out_proj", "attn.out_proj", None),
             ("mlp.fc1", "mlp.c_fc", None), ("mlp.fc2", "mlp.c_proj", None)]


@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: a weight tensor name in the model and an optional row slice."""
    param: str
    rows: slice | None = None


def lora_targets(model: torch.nn.Module) -> dict[str, Target]:
    """kohya module name → target weight, for every linear/conv layer a LoRA can touch."""
    from ..checkpoints.keymaps.unet import RESNET, unet_prefix_table
    out: dict[str, Target] = {}
    unet_prefix = "model.diffusion_model."
    table = unet_prefix_table(model.config.unet)
    for name, mod in model.unet.named_modules():
        if not isinstance(mod, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        t = Target(unet_prefix + name + ".weight")
        out["lora_unet_" + name.replace(".", "_")] = t
        for dif, orig, is_res in table:  # the diffusers spelling used by SD1/SD2 kohya files
            if name == orig:
                out["lora_unet_" + dif.replace(".", "_")] = t
                break
            if name.startswith(orig + "."):
                rest = name[len(orig) + 1:]
                if is_res:
                    rest = next((d + rest[len(o):] for d, o in RESNET if rest.startswith(o)), None)
                if rest is not None:
                    out["lora_unet_" + (dif + "." + rest).replace(".", "_")] = t
                break
    n = len(model.config.text_encoders)
    for i, (prefix, te, cfg) in enumerate(zip(model.text_encoder_prefixes(), model.text_encoders,
                                              model.config.text_encoders)):
        tags = ["lora_te_"] if n == 1 else [f"lora_te{i + 1}_"]
        if cfg.layout == "hf":
            for name, mod in te.named_modules():
                if isinstance(mod, torch.nn.Linear) and name.startswith("transformer.text_model."):
                    hf = name[len("transformer."):].replace(".", "_")
                    for tag in tags:
                        out[tag + hf] = Target(prefix + name + ".weight")
        else:
            width = cfg.width
            for layer in range(cfg.layers):
                for hf_name, oc_name, idx in _OPENCLIP:
                    hf = f"text_model_encoder_layers_{layer}_" + hf_name.replace(".", "_")
                    param = f"{prefix}model.transformer.resblocks.{layer}.{oc_name}" + (
                        "_weight" if idx is not None else ".weight")
                    rows = slice(idx * width, (idx + 1) * width) if idx is not None else None
                    for tag in tags:
                        out[tag + hf] = Target(param, rows)
    return out


def lora_delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """up @ down, reshaped to the target weight (linear, 1×1 conv, or k×k LoCon conv)."""
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        return torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


@dataclass
class LoraFile:
    name: str
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


def read_lora(path: str | Path) -> LoraFile:
    """A kohya/A1111 LoRA file (safetensors, or .pt/.ckpt through weights_only)."""
    from ..checkpoints.load import open_file
    src = open_file(path)
    lf = LoraFile(Path(path).stem)
    for key in src.shapes:
        mod, _, part = key.partition(".")
        if part in ("lora_down.weight", "lora_up.weight", "alpha"):
            lf.modules.setdefault(mod, {})[part] = src.get(key)
    if not lf.modules:
        raise ModelFileError(f"{Path(path).name}: no LoRA tensors (expected kohya "
                             "'lora_*.lora_down.weight')")
    return lf


class LoraManager:
    """Merges LoRAs into a model's weights and restores the originals exactly on `clear()`."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.backup: dict[str, torch.Tensor] = {}
        self.applied: list[tuple[str, float]] = []
        self._targets: dict[str, Target] | None = None

    def apply(self, lora: LoraFile, weight: float = 1.0) -> int:
        """Merge `lora` at `weight`; returns the number of modules it touched."""
        if self._targets is None:
            self._targets = lora_targets(self.model)
        params = dict(self.model.named_parameters())
        unknown = [m for m in lora.modules if m not in self._targets]
        if len(unknown) == len(lora.modules):
            raise ModelFileError(f"LoRA {lora.name!r} does not fit this model "
                                 f"(first key {unknown[0]!r})")
        self._check(lora, params)
        n = 0
        with torch.no_grad():
            for mod, parts in lora.modules.items():
                if mod not in self._targets or "lora_down.weight" not in parts:
                    continue
                t = self._targets[mod]
                p = params[t.param]
                if t.param not in self.backup:
                    self.backup[t.param] = p.detach().clone()
                down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
                rank = down.shape[0]
                scale = weight * (float(parts["alpha"]) / rank if "alpha" in parts else 1.0)
                target = p if t.rows is None else p[t.rows]
                delta = lora_delta(down, up, target.shape) * scale
                target += delta.to(p.device, p.dtype)
                n += 1
        self.applied.append((lora.name, weight))
        return n

    def _check(self, lora: LoraFile, params: dict[str, torch.Tensor]) -> None:
        """Every module's shapes fit its target, checked before any weight changes."""
        for mod, parts in lora.modules.items():
            if mod not in self._targets or "lora_down.weight" not in parts:
                continue
            down, up = parts["lora_down.weight"], parts.get("lora_up.weight")
            t = self._targets[mod]
            p = params[t.param]
            target = p.shape if t.rows is None else p[t.rows].shape
            what = f"LoRA {lora.name!r} does not fit this model: {mod}"
            if up is None:
                raise ModelFileError(f"{what} has lora_down.weight but no lora_up.weight")
            if "alpha" in parts and parts["alpha"].numel() != 1:
                raise ModelFileError(f"{what}.alpha has {parts['alpha'].numel()} values, not 1")
            # what `lora_delta` needs: up [out, r(,1,1)] @ down [r, in(,k,k)] = the weight
            ok = (down.ndim >= 2 and up.ndim >= 2 and up.flatten(1).shape[1] == down.shape[0]
                  and up.shape[0] == target[0])
            if ok and down.ndim == 4 and down.shape[2:] != (1, 1):
                ok = tuple(down.shape[1:]) == tuple(target[1:])
            elif ok:
                ok = down.flatten(1).shape[1] * target[0] == math.prod(target)
            if not ok:
                raise ModelFileError(f"{what} has down {list(down.shape)} and up "
                                     f"{list(up.shape)}, the weight is {list(target)} "
                                     "(a LoRA for another model family?)")

    def clear(self) -> None:
        """Restore every touched weight to its value before the first `apply`."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, orig in self.backup.items():
                params[name].copy_(orig)
        self.backup.clear()
        self.applied.clear()


def extract_prompt_loras(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Strip `<lora:name:weight>` tags from a prompt; returns the rest and (name, weight) pairs."""
    found = []
    for m in LORA_IN_PROMPT.finditer(prompt):
        name, text = m.group(1), (m.group(2) or "").strip()
        try:
            w = float(text) if text else 1.0
        except ValueError:
            w = math.nan
        if not math.isfinite(w):
            raise SdloomError(f"LoRA weight for {name[:60]!r} must be a finite number, "
                              f"got {text[:20]!r}")
        found.append((name, w))
    return LORA_IN_PROMPT.sub("", prompt), found
