"""LoRA (Hu et al. 2021) files in kohya/A1111 naming, merged into the weights and reversible.

Key names: `lora_unet_<path>` with the U-Net path in diffusers names (SD1/SD2 kohya files) or
original SGM names (SDXL kohya files), `lora_te_` / `lora_te1_` / `lora_te2_` + transformers
CLIP names. Each module has `.lora_down.weight` [r, in(, k, k)], `.lora_up.weight` [out, r(, 1, 1)]
and an optional `.alpha` (scale = alpha / r). The same names are what `sdloom train` writes.
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
    """Where a LoRA module lands: a weight tensor name in the model and an optional row slice."""
    param: str
    rows: slice | None = None


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
