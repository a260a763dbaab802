"""A1111 seed semantics: -1 → random, seed+i per image, noise from seeded CPU generators so a seed
gives the same image on every device, variation seeds blended by slerp."""
from __future__ import annotations

import random

import torch

MAX_SEED = 4294967294


def fix_seed(seed: int | str | None) -> int:
    """-1, None, '' or anything unparsable → a random seed; otherwise the seed itself."""
    try:
        s = int(seed)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        s = -1
    return random.randrange(MAX_SEED) if s == -1 else s


def all_seeds(seed: int, n: int, subseed: int = -1, subseed_strength: float = 0.0
              ) -> tuple[list[int], list[int]]:
    """Per-image seeds and variation seeds: seed+i, or (with variations) one seed and subseed+i."""
    if subseed_strength > 0:
        return [seed] * n, [subseed + i for i in range(n)]
    return [seed + i for i in range(n)], [subseed] * n


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two noise tensors (lerp when they are nearly parallel)."""
    an, bn = a / a.norm(), b / b.norm()
    dot = (an * bn).sum()
    if dot.abs() > 0.9995:
        return (1 - t) * a + t * b
    omega = torch.acos(dot)
    so = torch.sin(omega)
    return torch.sin((1 - t) * omega) / so * a + torch.sin(t * omega) / so * b


def image_noise(seeds: list[int], shape: tuple[int, int, int], subseeds: list[int] | None = None,
                subseed_strength: float = 0.0, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, C, H, W] starting noise: image i from torch.Generator('cpu').manual_seed(seeds[i])."""
    out = []
    for i, s in enumerate(seeds):
        n = torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
        if subseeds is not None and subseed_strength > 0:
            sub = torch.randn(shape, generator=torch.Generator().manual_seed(int(subseeds[i])))
            n = slerp(subseed_strength, n, sub)
        out.append(n)
    return torch.stack(out).to(device, dtype)


def sampler_generator(seeds: list[int]) -> torch.Generator:
    """The CPU generator for noise drawn during sampling (ancestral/SDE samplers).

    One generator per batch, seeded with the batch's first seed plus a fixed offset so it does
    not replay the starting noise. A1111 keeps one generator per image instead; batches here are
    reproducible for the same seed and batch size."""
    return torch.Generator().manual_seed((int(seeds[0]) + 0x5EED) % (2 ** 63))
