"""Tiled VAE decode and encode: images larger than memory allows, for any family's AutoencoderKL.

The latent (or image) is cut into overlapping tiles, each tile goes through the VAE alone, and
the overlaps are blended with ramps that sum to one (MultiDiffusion-style, Bar-Tal et al. 2023;
ComfyUI's `tiled_scale` feathers its overlaps likewise), so no seam shows where tiles meet.

GroupNorm normalises over the whole image, which a tile alone cannot see. By default
(`norm_stats="tile"`) each tile uses its own statistics. With `norm_stats="whole"` every
GroupNorm's per-group mean and variance are first recorded in one pass over the whole input,
shrunk (area) to at most `stats_side` latent cells a side (default: one tile, so no more memory
than a tile; multidiffusion-upscaler's "fast encoder/decoder" estimate), and every tile is
normalised with them. On the embedded model's trained VAE (docs/benchmarks.md) the exact whole
statistics (no shrinking) cut the mean decode difference from untiled by 2-3x, but the
estimate from a 2x-shrunk latent was worse than per-tile statistics, hence the default. Other
differences from an untiled pass: the convolutions' zero padding at tile edges (which the
ramps fade out) and the middle block's attention seeing one tile only.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

BLENDS = ("linear", "cosine", "none")
NORM_STATS = ("whole", "tile")


def spans(size: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """[start, end) tiles of length `tile` covering 0..size, spread evenly, neighbours
    overlapping by at least `overlap` (one tile when `size` fits)."""
    if tile <= overlap or overlap < 0:
        raise ValueError(f"tile ({tile}) must be larger than overlap ({overlap}) ≥ 0")
    if size <= tile:
        return [(0, size)]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [(s, s + tile) for s in (round(i * (size - tile) / (n - 1)) for i in range(n))]


def _ramp(n: int, blend: str) -> torch.Tensor:
    """Weights rising across an overlap of n samples; ramp + ramp.flip(0) == 1 (a partition of
    unity between two neighbours). `none` is a hard cut at the middle (the seam control)."""
    t = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    if blend == "linear":
        return t
    if blend == "cosine":
        return 0.5 - 0.5 * torch.cos(math.pi * t)
    if blend == "none":
        return (t >= 0.5).float()
    raise ValueError(f"blend must be one of {', '.join(BLENDS)}, got {blend!r}")


def _axis_weights(sp: list[tuple[int, int]], k: int, f: int, blend: str) -> torch.Tensor:
    """Tile k's weights along one axis, `f` samples per cell: ramps over the parts it shares
    with its neighbours, 1 elsewhere."""
    s, e = sp[k]
    w = torch.ones((e - s) * f)
    if k > 0 and (n := (sp[k - 1][1] - s) * f) > 0:
        w[:n] *= _ramp(n, blend)
    if k < len(sp) - 1 and (n := (e - sp[k + 1][0]) * f) > 0:
        w[-n:] *= _ramp(n, blend).flip(0)
    return w


def _blend_tiles(run, h: int, w: int, tile: int, overlap: int, f: int, blend: str
                 ) -> list[torch.Tensor]:
    """Σ weight·run(y0, y1, x0, x1) / Σ weight over the tiles of an h×w grid of cells; run
    returns tensors of [B, C, (y1-y0)·f, (x1-x0)·f], accumulated in fp32."""
    ys, xs = spans(h, tile, overlap), spans(w, tile, overlap)
    acc: list[torch.Tensor] = []
    total = None
    for i, (y0, y1) in enumerate(ys):
        wy = _axis_weights(ys, i, f, blend)
        for j, (x0, x1) in enumerate(xs):
            outs = run(y0, y1, x0, x1)
            wt = (wy[:, None] * _axis_weights(xs, j, f, blend)[None]).to(outs[0].device)
            if total is None:
                total = torch.zeros(h * f, w * f, device=wt.device)
                acc = [torch.zeros(*o.shape[:2], h * f, w * f, device=wt.device) for o in outs]
            region = (..., slice(y0 * f, y1 * f), slice(x0 * f, x1 * f))
            total[region] += wt
            for a, o in zip(acc, outs):
                a[region] += o.float() * wt
    return [a / total for a in acc]


@contextmanager
def _groupnorm_stats(vae: nn.Module, record: bool, store: dict):
    """Inside, every GroupNorm of `vae` records its per-(image, group) mean and variance into
    `store` (record=True), or normalises with the recorded ones instead of its input's."""
    mods = [m for m in vae.modules() if isinstance(m, nn.GroupNorm)]

    def patched(m: nn.GroupNorm):
        def forward(x: torch.Tensor) -> torch.Tensor:
            xg = x.float().reshape(x.shape[0], m.num_groups, -1)
            if record:
                var, mean = torch.var_mean(xg, dim=2, unbiased=False)
                store[m] = (mean[..., None], var[..., None])
            mean, var = store[m]
            y = ((xg - mean) * torch.rsqrt(var + m.eps)).reshape(x.shape).to(x.dtype)
            return y * m.weight[:, None, None] + m.bias[:, None, None]
        return forward

    for m in mods:
        m.forward = patched(m)
    try:
        yield
    finally:
        for m in mods:
            del m.forward  # back to the class's forward


def _shrunk(t: torch.Tensor, side: int, multiple: int) -> torch.Tensor:
    """t resized so that its longer side is at most `side`, sides multiples of
    `multiple`; t itself when it fits."""
    h, w = t.shape[-2:]
    if max(h, w) <= side:
        return t
    s = side / max(h, w)
    size = [max(multiple, round(d * s / multiple) * multiple) for d in (h, w)]
    return F.interpolate(t.float(), size=size, mode="area").to(t.dtype)


@contextmanager
def _whole_stats(vae: nn.Module, norm_stats: str, stats_pass):
    """norm_stats "whole": run `stats_pass` once recording GroupNorm statistics, then use them
    inside; "tile": each tile its own."""
    if norm_stats not in NORM_STATS:
        raise ValueError(f"norm_stats must be one of {', '.join(NORM_STATS)}, got {norm_stats!r}")
    if norm_stats == "tile":
        yield
        return
    store: dict = {}
    with _groupnorm_stats(vae, True, store):
        stats_pass()
    with _groupnorm_stats(vae, False, store):
        yield


def decode_tiled(vae, z: torch.Tensor, tile: int = 64, overlap: int = 8,
                 factor: int | None = None, blend: str = "linear", norm_stats: str = "tile",
                 stats_side: int | None = None) -> torch.Tensor:
    """vae.decode in tiles of `tile`² latent cells overlapping by `overlap`, blended in pixel
    space; `factor` = pixels per latent cell (the family's LatentFormat.factor)."""
    f = factor or vae.config.downscale
    _, _, h, w = z.shape
    with _whole_stats(vae, norm_stats, lambda: vae.decode(_shrunk(z, stats_side or tile, 1))):
        (img,) = _blend_tiles(lambda y0, y1, x0, x1: [vae.decode(z[..., y0:y1, x0:x1])],
                              h, w, tile, overlap, f, blend)
    return img.to(z.dtype)


def encode_tiled(vae, x: torch.Tensor, tile: int = 64, overlap: int = 8,
                 factor: int | None = None, blend: str = "linear", norm_stats: str = "tile",
                 stats_side: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """vae.encode in tiles of the image (`tile` and `overlap` in latent cells): the
    posterior's mean and logvar, blended in latent space."""
    f = factor or vae.config.downscale
    H, W = x.shape[-2:]
    h, w = H // f, W // f  # what the stride-2 convs give for the whole image

    def run(y0, y1, x0, x1):
        # the last row/column of tiles also takes the pixels past the last whole cell, as the
        # whole image's encoder does
        py1, px1 = (H if y1 == h else y1 * f), (W if x1 == w else x1 * f)
        return list(vae.encode(x[..., y0 * f:py1, x0 * f:px1]))

    with _whole_stats(vae, norm_stats, lambda: vae.encode(_shrunk(x, (stats_side or tile) * f, f))):
        mean, logvar = _blend_tiles(run, h, w, tile, overlap, 1, blend)
    return mean.to(x.dtype), logvar.to(x.dtype)


def image_from_latent_tiled(vae, z: torch.Tensor, **kw) -> torch.Tensor:
    """vae.image_from_latent, tiled (`decode_tiled`'s keywords)."""
    return decode_tiled(vae, z / vae.config.scale_factor + vae.config.shift_factor, **kw)


def latent_from_image_tiled(vae, x: torch.Tensor, generator: torch.Generator | None = None,
                            sample: bool = False, **kw) -> torch.Tensor:
    """vae.latent_from_image, tiled: the posterior noise is drawn once for the whole latent,
    exactly as untiled, so tiling does not change the randomness."""
    mean, logvar = encode_tiled(vae, x, **kw)
    return vae.latent_from_posterior(mean, logvar, generator, sample)


def bench(latent_side: int = 128, tiled: bool = True, tile: int = 64, overlap: int = 8) -> dict:
    """Peak memory and time of one decode of a random latent through a full-size SD VAE
    (diffusers' default AutoencoderKL config, random weights, fp32) on this machine's device:
    run each setting in its own process, since peak RSS (VmHWM) only grows."""
    import resource
    import time

    from .config import VAEConfig
    from .models.vae import AutoencoderKL

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig()).eval().to(dev)
    z = torch.randn(1, 4, latent_side, latent_side, device=dev)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (KiB on Linux)
    t = time.perf_counter()
    with torch.no_grad():
        img = decode_tiled(vae, z, tile, overlap) if tiled else vae.decode(z)
    seconds = time.perf_counter() - t
    out = {"tiled": tiled, "tile": tile, "overlap": overlap, "image": list(img.shape[-2:]),
           "seconds": round(seconds, 1), "rss_before_gib": round(before, 2),
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if dev.type == "cuda":
        out["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


if __name__ == "__main__":  # python -m sdloom.tiled_vae [untiled|tiled] [latent side]
    import json
    import sys
    args = sys.argv[1:]
    print(json.dumps(bench(int(args[1]) if len(args) > 1 else 128,
                           tiled=(args[0] if args else "tiled") == "tiled")))
