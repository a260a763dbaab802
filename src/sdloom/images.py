"""Image helpers shared by pipelines, CLI and server: tensors ⇄ PIL, resize modes, grids, names."""
from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import SdloomError


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in [-1, 1] → 8-bit RGB images (clamp, scale, round to nearest)."""
    arr = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def from_pil(img: Image.Image) -> torch.Tensor:
    """RGB image → [1, 3, H, W] in [-1, 1]."""
    a = np.asarray(img.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1)[None].contiguous()


def load_image(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                bg = Image.new("RGB", im.size, (255, 255, 255))
                rgba = im.convert("RGBA")
                bg.paste(rgba, mask=rgba.split()[-1])
                return bg
            return im.convert("RGB") if im.mode not in ("RGB", "L") else im.copy()
    except FileNotFoundError:
        raise SdloomError(f"cannot read image {path}: no such file") from None
    except (UnidentifiedImageError, OSError) as e:
        raise SdloomError(f"cannot read image {path}: {e}") from None


def resize_image(img: Image.Image, w: int, h: int, mode: int = 0) -> Image.Image:
    """A1111 resize modes: 0 just resize, 1 crop and resize, 2 resize and fill."""
    if img.size == (w, h):
        return img.copy()
    if mode == 0:
        return img.resize((w, h), Image.LANCZOS)
    ratio, src_ratio = w / h, img.width / img.height
    if mode == 1:  # scale to cover, centre-crop
        sw, sh = (w, round(w / src_ratio)) if ratio > src_ratio else (round(h * src_ratio), h)
        r = img.resize((sw, sh), Image.LANCZOS)
        left, top = (sw - w) // 2, (sh - h) // 2
        return r.crop((left, top, left + w, top + h))
    if mode == 2:  # scale to fit, fill the borders by stretching the edges
        sw, sh = (round(h * src_ratio), h) if ratio > src_ratio else (w, round(w / src_ratio))
        r = img.resize((sw, sh), Image.LANCZOS)
        out = Image.new(img.mode, (w, h))
        out.paste(r.resize((w, h), Image.LANCZOS))
        out.paste(r, ((w - sw) // 2, (h - sh) // 2))
        return out
    raise SdloomError(f"resize mode must be 0, 1 or 2, got {mode}")


def image_grid(images: list[Image.Image], rows: int | None = None) -> Image.Image:
    """Images in a grid; by default about square (A1111: rows = √n rounded)."""
    n = len(images)
    rows = rows or max(1, round(math.sqrt(n)))
    cols = math.ceil(n / rows)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), (255, 255, 255))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def unique_output_path(directory: str | Path, prefix: str = "", suffix: str = "",
                       ext: str = ".png") -> Path:
    """A1111-style `NNNNN<suffix>.png`, numbered after the highest existing file; never reuses
    a name."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    pat = re.compile(re.escape(prefix) + r"(\d{5})")
    nums = [int(m.group(1)) for p in d.iterdir() if (m := pat.match(p.name))]
    n = max(nums, default=-1) + 1
    while True:
        p = d / f"{prefix}{n:05d}{suffix}{ext}"
        if not p.exists():
            return p
        n += 1
