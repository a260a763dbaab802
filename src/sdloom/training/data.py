"""Training data: a folder of images with same-name .txt captions, or a metadata.jsonl
(file_name, text) as kohya and diffusers users already have. Deterministic, resumable order."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SdloomError

EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Item:
    path: Path
    text: str
    size: tuple[int, int] = (0, 0)  # target (w, h) after bucketing


def read_items(root: Path, include_holdout: bool = False) -> list[Item]:
    root = Path(root)
    if not root.is_dir():
        raise SdloomError(f"training data folder not found: {root}")
    meta = root / "metadata.jsonl"
    items: list[Item] = []
    if meta.exists():
        for n, line in enumerate(meta.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
                if r.get("holdout") and not include_holdout:
                    continue
                items.append(Item(root / r["file_name"], str(r.get("text", ""))))
            except (json.JSONDecodeError, KeyError) as e:
                raise SdloomError(f"{meta}:{n + 1}: bad row ({e})") from None
    else:
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in EXTS:
                cap = p.with_suffix(".txt")
                items.append(Item(p, cap.read_text().strip() if cap.exists() else ""))
    if not items:
        raise SdloomError(f"no training images in {root} (expected images with .txt captions "
                          "or a metadata.jsonl)")
    return items


def bucket_sizes(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """Aspect-ratio buckets of about resolution² pixels, sides multiples of `step`."""
    area = resolution * resolution
    out = set()
    w = step
    while w <= resolution * 2:
        h = int(area / w) // step * step
        if step <= h <= resolution * 2:
            out.add((w, h))
        w += step
    return sorted(out)


def fit(img: Image.Image, w: int, h: int, rng: random.Random | None) -> Image.Image:
    """Resize to cover (w, h), then crop: centred, or at a random offset when `rng` is given."""
    scale = max(w / img.width, h / img.height)
    img = img.resize((max(w, round(img.width * scale)), max(h, round(img.height * scale))),
                     Image.LANCZOS)
    dx, dy = img.width - w, img.height - h
    x0 = rng.randint(0, dx) if rng and dx else dx // 2
    y0 = rng.randint(0, dy) if rng and dy else dy // 2
    return img.crop((x0, y0, x0 + w, y0 + h))


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as im:
        im.load()
        if im.mode in ("RGBA", "LA", "P"):
            rgba = im.convert("RGBA")
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(rgba, mask=rgba.split()[-1])
            return bg
        return im.convert("RGB")


class ImageCaptionSet:
    """Images resized/cropped to the training size, kept in memory as uint8."""

    def __init__(self, root: Path, resolution: int, *, buckets: bool = False,
                 random_crop: bool = False, include_holdout: bool = False, seed: int = 0):
        self.items = read_items(root, include_holdout)
        self.random_crop = random_crop
        sizes = bucket_sizes(resolution) if buckets else [(resolution, resolution)]
        for it in self.items:
            if buckets:
                with Image.open(it.path) as im:
                    ar = im.width / im.height
                it.size = min(sizes, key=lambda s: abs(np.log(s[0] / s[1]) - np.log(ar)))
            else:
                it.size = sizes[0]
        rng = random.Random(seed) if random_crop else None
        self.pixels = [np.asarray(fit(load_rgb(it.path), *it.size, rng)) for it in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def batches(self, epoch: int, batch: int, seed: int, rank: int = 0, world: int = 1
                ) -> list[list[int]]:
        """This rank's batches of one epoch: a seeded permutation, grouped by bucket size,
        whole batches only; rank r takes every world-th batch."""
        g = torch.Generator().manual_seed(seed * 100003 + epoch)
        perm = torch.randperm(len(self), generator=g).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for i in perm:
            groups.setdefault(self.items[i].size, []).append(i)
        out = []
        for size in sorted(groups):
            idx = groups[size]
            out += [idx[k:k + batch] for k in range(0, len(idx) - batch + 1, batch)]
        order = torch.randperm(len(out), generator=g).tolist()
        out = [out[i] for i in order]
        usable = len(out) // world * world
        return out[rank:usable:world]

    def tensor(self, idx: list[int], flip: torch.Tensor | None = None) -> torch.Tensor:
        """[B, 3, H, W] in [-1, 1]; images with flip[i] set are mirrored horizontally."""
        x = torch.from_numpy(np.stack([self.pixels[i] for i in idx])).permute(0, 3, 1, 2)
        x = x.float() / 127.5 - 1.0
        if flip is not None and flip.any():
            x[flip] = x[flip].flip(-1)
        return x

    def captions(self, idx: list[int]) -> list[str]:
        return [self.items[i].text for i in idx]
