"""An embedded upscaler against Lanczos: held-out emoji made 4× smaller (128² → 512²), then
upscaled 4× back, compared with the 512² targets by PSNR and SSIM. Prints JSON.

    PYTHONPATH=src python bench/eval_upscale.py --data data/emoji512svg [--model FILE] [--device auto]

The inputs are what training makes (`low_res_of`: antialiased bicubic, 8-bit levels). An
ESRGAN-family file (the default: the shipped sdloom-emoji-esrgan-x4) runs image by image as
`sdloom upscale` runs it (upscalers.run_model, tiled as A1111). An SD x4 upscaler runs as
`sdloom upscale` runs it too (upscalers.X4_*: DDIM, 20 steps, noise level 20, empty prompt,
seed 0) on a whole batch, and "vae" is its VAE round trip of the targets (the best a latent
upscaler with this VAE can do). PSNR and SSIM are per image on 8-bit RGB in
[0, 1], averaged over images. SSIM as Wang et al. 2004: 11×11 Gaussian window, σ = 1.5,
K1 = 0.01, K2 = 0.03, valid positions only, per channel, averaged.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from sdloom import upscalers
from sdloom.checkpoints.load import load_model
from sdloom.families.x4_upscaler import DEFAULT_NOISE_LEVEL, low_res_of, upscale_image
from sdloom.training.data import load_rgb, read_items
from sdloom.training.sr_train import gaussian_blur


def gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 2-D Gaussian [size, size]."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-x * x / (2 * sigma * sigma))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(a: torch.Tensor, b: torch.Tensor, *, data_range: float = 1.0, size: int = 11,
         sigma: float = 1.5, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM per image of [B, C, H, W] images (Wang et al. 2004, eq. 13, Gaussian-weighted
    local statistics over valid windows, channels averaged)."""
    a, b = a.double(), b.double()
    c = a.shape[1]
    w = gaussian_window(size, sigma).to(a.device)[None, None].expand(c, 1, size, size)

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, w, groups=c)
    mu_a, mu_b = filt(a), filt(b)
    var_a = filt(a * a) - mu_a ** 2
    var_b = filt(b * b) - mu_b ** 2
    cov = filt(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)
         / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2)))
    return s.flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """PSNR per image in dB."""
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range ** 2 / mse.clamp(min=1e-12))


def to_unit(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] → 8-bit levels in [0, 1] (what a saved PNG holds)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round() / 255.0


def lanczos(low: torch.Tensor, size: int) -> torch.Tensor:
    """PIL's Lanczos of [B, 3, h, w] 8-bit levels in [0, 1] to size² (A1111's "Lanczos")."""
    out = []
    for x in low:
        a = (x * 255).round().byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(a, "RGB").resize((size, size), Image.LANCZOS)
        out.append(torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255)
    return torch.stack(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default="data/emoji512svg", help="512² targets + metadata.jsonl")
    ap.add_argument("--model", default=str(upscalers.EMBEDDED[0][1]),
                    help="an ESRGAN-family or SD x4 upscaler file (default: the shipped "
                         f"{upscalers.EMBEDDED[0][0]})")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--limit", type=int, help="only the first N held-out images")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=upscalers.X4_STEPS)
    ap.add_argument("--noise-level", type=int, default=DEFAULT_NOISE_LEVEL)
    ap.add_argument("--picture", help="also save a PNG of the first 4 images: input "
                    "(nearest), Lanczos, model, target")
    ap.add_argument("--picture-crop", type=int, default=0, metavar="N",
                    help="show only the central N×N pixels of each panel, at 1:1 (0: whole)")
    ap.add_argument("--blur", type=float, default=0.0, metavar="SIGMA",
                    help="blur the 512² targets by a Gaussian of SIGMA pixels before making the "
                         "inputs (softer inputs, like generated images; scores stay against the "
                         "sharp targets)")
    ap.add_argument("--all", action="store_true",
                    help="every image, not only the held-out ones (training images included)")
    a = ap.parse_args(argv)
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu")
                       if a.device == "auto" else a.device)
    items = read_items(a.data, include_holdout=True)
    if not a.all:
        rows = [json.loads(ln) for ln in (Path(a.data) / "metadata.jsonl").read_text(
            encoding="utf-8").splitlines() if ln.strip()]
        items = [it for it in items if rows[it.row].get("holdout")]
    items = items[:a.limit] if a.limit else items
    if not items:
        print("no images to evaluate", file=sys.stderr)
        return 1
    if not Path(a.model).is_file():
        print(f"no upscaler file {a.model}", file=sys.stderr)
        return 1
    entry = upscalers.describe(a.model)
    if entry.ldsr or entry.scale != 4:
        print(f"{a.model}: not a 4× ESRGAN-family or SD x4 upscaler", file=sys.stderr)
        return 1
    if entry.x4:
        model = load_model(a.model, device=dev, dtype=torch.float16 if dev.type == "cuda"
                           else torch.float32).model.eval()
    else:
        model = upscalers.load(a.model, dev)
    kinds = ("model", "lanczos", "vae") if entry.x4 else ("model", "lanczos")
    scores: dict[str, dict[str, list[float]]] = {k: {"psnr": [], "ssim": []} for k in kinds}
    t0 = time.perf_counter()
    secs = 0.0
    shown: list[torch.Tensor] = []
    for k in range(0, len(items), a.batch):
        hi = torch.stack([torch.from_numpy(np.array(load_rgb(it.path))).permute(2, 0, 1)
                          for it in items[k:k + a.batch]]).float() / 127.5 - 1
        size = hi.shape[-1]
        target = to_unit(hi)
        low = low_res_of(gaussian_blur(hi, a.blur))
        t1 = time.perf_counter()
        if entry.x4:
            up = to_unit(upscale_image(model, low, steps=a.steps, sampler=upscalers.X4_SAMPLER,
                                       seed=0, noise_level=a.noise_level,
                                       tile=upscalers.X4_TILE, overlap=upscalers.X4_OVERLAP))
        else:  # the PNG `sdloom upscale` would write, read back
            up = torch.stack([upscalers.to_tensor(upscalers.run_model(
                model, upscalers.to_image(x[None]))).squeeze(0) for x in to_unit(low)])
        secs += time.perf_counter() - t1
        outs = {"model": up, "lanczos": lanczos(to_unit(low), size)}
        if entry.x4:
            with torch.no_grad():
                vae = model.first_stage_model
                rec = vae.decode(vae.encode(hi.to(dev, model.dtype))[0]).float().cpu()
            outs["vae"] = to_unit(rec)
        for name, x in outs.items():
            scores[name]["psnr"] += psnr(x, target).tolist()
            scores[name]["ssim"] += ssim(x, target).tolist()
        if a.picture and len(shown) < 4:
            near = F.interpolate(to_unit(low), scale_factor=4, mode="nearest")
            row = [near, outs["lanczos"], outs["model"], target]
            if a.picture_crop:
                o = (size - a.picture_crop) // 2
                row = [x[..., o:o + a.picture_crop, o:o + a.picture_crop] for x in row]
            shown += [torch.cat([x[i] for x in row], dim=2) for i in range(len(hi))]
    res = {name: {m: round(float(np.mean(v)), 4) for m, v in s.items()}
           for name, s in scores.items()}
    res.update(images=len(items), held_out=not a.all, size=f"{size // 4} -> {size}",
               model_file=Path(a.model).name, device=dev.type, blur=a.blur,
               **({"steps": a.steps, "noise_level": a.noise_level} if entry.x4 else {}),
               upscale_s_per_image=round(secs / len(items), 4),
               wall_s=round(time.perf_counter() - t0, 1))
    if a.picture:
        grid = torch.cat(shown[:4], dim=1)
        arr = (grid * 255).round().byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr, "RGB").save(a.picture)
        res["picture"] = a.picture
    print(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
