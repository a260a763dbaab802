"""LoRA (Hu et al. 2021) files, merged into the weights and reversible.

Two spellings of one module, one reader:
- kohya/A1111: `<module>.lora_down.weight` [r, in(, k, k)], `<module>.lora_up.weight`
  [out, r(, 1, 1)] and an optional `<module>.alpha`; module names like `lora_unet_<path>` (U-Net
  path in diffusers names for SD1/SD2 files, original SGM names for SDXL and SD3 files) and
  `lora_te_` / `lora_te1_` … + transformers names. The same names are what `sdloom train` writes.
- diffusers/PEFT: `<module>.lora_A.weight` (= down), `<module>.lora_B.weight` (= up), optional
  `<module>.alpha`; module names are dotted diffusers paths (`transformer.transformer_blocks.0.
  attn.to_q`, `text_encoder.text_model.…`).
Either way the delta is up @ down · alpha / r, alpha defaulting to r (scale 1). Which module
names a model takes is its family's `lora_targets`.
"""
from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import ModelFileError, SdloomError

LORA_IN_PROMPT = re.compile(r"<lora:([^:>]+)(?::([^:>]*))?(?::[^>]*)?>")

@dataclass(frozen=True)
class Target:
    """Where a LoRA module lands: a weight tensor name in the model, an optional row slice, and
    whether the weight stores the module's two output halves in the other order (SD3's adaLN:
    diffusers (scale, shift), original (shift, scale))."""
    param: str
    rows: slice | None = None
    swap_halves: bool = False


def lora_delta(down: torch.Tensor, up: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """up @ down, reshaped to the target weight (linear, 1×1 conv, or k×k LoCon conv)."""
    if down.ndim == 4 and down.shape[2:] != (1, 1):
        return torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return (up.flatten(1) @ down.flatten(1)).reshape(shape)


@dataclass
class LoraFile:
    name: str
    modules: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)


# key suffix → part name in LoraFile.modules (PEFT's A/B read as kohya's down/up)
_PARTS = {".lora_down.weight": "lora_down.weight", ".lora_up.weight": "lora_up.weight",
          ".lora_A.weight": "lora_down.weight", ".lora_B.weight": "lora_up.weight",
          ".alpha": "alpha"}
# parts a plain merge would silently get wrong: refused rather than dropped
_UNSUPPORTED = {".dora_scale": "DoRA", ".lora_magnitude_vector": "DoRA",
                ".lora_B.bias": "a LoRA bias (PEFT lora_bias)"}


def read_lora(path: str | Path) -> LoraFile:
    """A kohya/A1111 or diffusers/PEFT LoRA file (safetensors, or .pt/.ckpt through
    weights_only)."""
    from ..checkpoints.load import open_file
    src = open_file(path)
    name = Path(path).name
    lf = LoraFile(Path(path).stem)
    for key in src.shapes:
        if bad := next((what for suf, what in _UNSUPPORTED.items() if key.endswith(suf)), None):
            raise ModelFileError(f"{name}: {key!r} is {bad}, which sdloom does not merge")
        suf = next((s for s in _PARTS if key.endswith(s)), None)
        if suf is None:
            continue
        mod, part = key[:-len(suf)], _PARTS[suf]
        parts = lf.modules.setdefault(mod, {})
        if part in parts:  # e.g. both lora_A and lora_down for one module
            raise ModelFileError(f"{name}: module {mod!r} has two {part} tensors")
        parts[part] = src.get(key)
    if not lf.modules:
        raise ModelFileError(f"{name}: no LoRA tensors (expected kohya "
                             "'lora_*.lora_down.weight' or PEFT '*.lora_A.weight')")
    return lf


class LoraManager:
    """Merges LoRAs into a model's weights and restores the originals exactly on `clear()`."""

    def __init__(self, model: torch.nn.Module, targets: Callable[[], dict[str, Target]]):
        """`targets()` maps LoRA module names to weights (the model family's lora_targets)."""
        self.model = model
        self._find_targets = targets
        self.backup: dict[str, torch.Tensor] = {}
        self.applied: list[tuple[str, float]] = []
        self._targets: dict[str, Target] | None = None

    def apply(self, lora: LoraFile, weight: float = 1.0) -> int:
        """Merge `lora` at `weight`; returns the number of modules it touched."""
        if self._targets is None:
            self._targets = self._find_targets()
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
                if t.swap_halves:
                    delta = torch.cat(delta.chunk(2, dim=0)[::-1], dim=0)
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
            if t.swap_halves and target[0] % 2:
                ok = False
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
