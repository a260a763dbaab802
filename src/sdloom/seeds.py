"""A1111 seed semantics with A1111's "RNG: CPU" noise, so a seed gives the same image everywhere.

* seed -1 (or None, '', unparsable) → random.randrange(4294967294)    (get_fixed_seed)
* image i of a job gets seed+i, or with variations the same seed and subseed+i
* each image has its own torch.Generator('cpu').manual_seed(seed_i); its starting noise is
  randn((C, H/8, W/8)) from that generator, whatever the device (A1111's randn_source "CPU")
* variation seeds: slerp(strength, noise, subnoise), A1111's per-column slerp
* seed resize: noise drawn at the old size, pasted centred into noise at the new size
* noise drawn during sampling (ancestral/SDE steps) continues each image's own generator, or,
  with ENSD (eta_noise_seed_delta), comes from fresh generators seeded seed_i + ENSD
  (modules/rng.py ImageRNG and sd_samplers_common.TorchHijack: every randn_like → rng.next())
"""
from __future__ import annotations

import random

import torch

MAX_SEED = 4294967294  # A1111: random.randrange(4294967294)


def fix_seed(seed: int | str | None) -> int:
    """-1, None, '' or an unparsable value → a random seed; any other value → itself as int."""
    try:
        s = int(seed)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        s = -1
    return random.randrange(MAX_SEED) if s == -1 else s


def all_seeds(seed: int, n: int, subseed: int = -1, subseed_strength: float = 0.0
              ) -> tuple[list[int], list[int]]:
    """Seeds and variation seeds of a job's n images (A1111 process_images_inner).

    Seeds are seed+i without variations, else all `seed`; subseeds are always subseed+i."""
    seeds = [seed + (i if subseed_strength == 0 else 0) for i in range(n)]
    return seeds, [subseed + i for i in range(n)]


def slerp(t: float, low: torch.Tensor, high: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Spherical linear interpolation (Shoemake 1985) along `dim`, A1111's rng.slerp.

    A1111 applies it to one image's [C, H, W] noise with dim=1: every (channel, column) vector
    of length H is interpolated on its own. When the two are nearly parallel (mean cosine
    > 0.9995) it falls back to lerp; A1111's fallback swaps the weights, which only matters
    when the tensors differ, and they are then equal (seed == subseed), so plain lerp is used."""
    low_n = low / low.norm(dim=dim, keepdim=True)
    high_n = high / high.norm(dim=dim, keepdim=True)
    dot = (low_n * high_n).sum(dim, keepdim=True)
    if dot.mean() > 0.9995:
        return torch.lerp(low, high, t)
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return torch.sin((1.0 - t) * omega) / so * low + torch.sin(t * omega) / so * high


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(int(seed)))


def _paste_centred(base: torch.Tensor, small: torch.Tensor) -> torch.Tensor:
    """`small` centred on `base` ([C, H, W]), cropped where it is larger (A1111 seed resize)."""
    dy, dx = (base.shape[1] - small.shape[1]) // 2, (base.shape[2] - small.shape[2]) // 2
    h = small.shape[1] if dy >= 0 else small.shape[1] + 2 * dy
    w = small.shape[2] if dx >= 0 else small.shape[2] + 2 * dx
    ty, tx, sy, sx = max(dy, 0), max(dx, 0), max(-dy, 0), max(-dx, 0)
    base[:, ty:ty + h, tx:tx + w] = small[:, sy:sy + h, sx:sx + w]
    return base


class ImageRNG:
    """Per-image CPU generators for one batch: starting noise, then noise during sampling.

    first() gives the starting noise [B, C, H, W]; after it, `generators` are what the sampler
    draws its ancestral/SDE noise from (image i from generator i, as A1111's rng.next()), so
    image i's noise does not depend on the batch it is in, and a batch of seeds [S, S+1] equals
    two single runs."""

    def __init__(self, shape: tuple[int, int, int], seeds: list[int],
                 subseeds: list[int] | None = None, subseed_strength: float = 0.0,
                 seed_resize_from: tuple[int, int] | None = None, ensd: int = 0,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 factor: int = 8):
        self.shape = tuple(int(s) for s in shape)
        self.seeds = [int(s) for s in seeds]
        self.subseeds = subseeds
        self.subseed_strength = subseed_strength
        self.seed_resize_from = seed_resize_from
        self.ensd = int(ensd or 0)
        self.device, self.dtype = device, dtype
        self.factor = factor  # pixels per latent cell (A1111's opt_f): seed resize is in pixels
        self.generators = [torch.Generator("cpu").manual_seed(s) for s in self.seeds]

    def _source_shape(self) -> tuple[int, int, int]:
        """The shape the seed's noise is drawn at: the old size when resizing a seed."""
        if self.seed_resize_from is None:
            return self.shape
        w, h = self.seed_resize_from
        if w <= 0 or h <= 0:  # A1111's "off" values (-1, 0)
            return self.shape
        return (self.shape[0], h // self.factor, w // self.factor)

    def first(self) -> torch.Tensor:
        """The starting noise [B, C, H, W] (A1111 ImageRNG.first)."""
        src = self._source_shape()
        variation = self.subseeds is not None and self.subseed_strength != 0
        out = []
        for i, (seed, g) in enumerate(zip(self.seeds, self.generators)):
            # the per-image generator always draws the full shape first, so the noise drawn
            # during sampling continues from the same place with or without seed resize
            full = torch.randn(self.shape, generator=g)
            noise = full if src == self.shape else _randn(seed, src)
            if variation:
                sub = self.subseeds[i] if i < len(self.subseeds) else 0  # A1111: missing → 0
                noise = slerp(self.subseed_strength, noise, _randn(sub, src))
            if src != self.shape:
                noise = _paste_centred(full, noise)
            out.append(noise)
        if self.ensd:
            self.generators = [torch.Generator("cpu").manual_seed(s + self.ensd)
                               for s in self.seeds]
        return torch.stack(out).to(self.device, self.dtype)
