"""Training data: a folder of images with same-name .txt captions, or a metadata.jsonl
(file_name, text) as kohya and diffusers users already have.

Order and augmentation are functions of (seed, epoch, position) alone: a batch is a list of
(index, augmentation seed) keys, so a resumed run, a run with DataLoader workers and each
process of a distributed run all see exactly the data an uninterrupted single run would.
"""
from __future__ import annotations

import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SdloomError

EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
MEMORY_BUDGET = 2 << 30  # keep prepared images in memory below this many bytes


@dataclass
class Item:
    """One training image: its file, caption, metadata row and target (w, h)."""
    path: Path
    text: str
    row: int = -1  # line in metadata.jsonl = index into images.npy; -1 for .txt folders
    size: tuple[int, int] = (0, 0)
    variants: tuple[str, ...] = ()  # metadata.jsonl's "variants": other captions of the image


@dataclass(frozen=True)
class Augment:
    """The random choices for one sample, drawn from its key's seed."""
    flip: bool
    crop: tuple[float, float]  # where the crop window sits in the free room, 0…1 each way
    drop_caption: bool
    template: int = 0  # index into the data set's caption templates
    variant: float = 0.0  # < 0.5: the caption; else it picks one of the image's variants
    window: tuple[float, float] = (0.5, 0.5)  # where the training window sits, 0…1 each way


def read_items(root: str | Path, include_holdout: bool = False) -> list[Item]:
    """Items of a metadata.jsonl (rows with "holdout": true skipped unless asked), or of
    images with same-name .txt captions (missing caption = "")."""
    root = Path(root)
    if not root.is_dir():
        raise SdloomError(f"training data folder not found: {root}")
    meta = root / "metadata.jsonl"
    items: list[Item] = []
    if meta.exists():
        rows = [ln for ln in meta.read_text(encoding="utf-8").splitlines() if ln.strip()]
        for n, line in enumerate(rows):
            try:
                r = json.loads(line)
                if r.get("holdout") and not include_holdout:
                    continue
                variants = r.get("variants") or []
                if not isinstance(variants, list):
                    raise TypeError("variants must be a list of captions")
                items.append(Item(root / r["file_name"], str(r.get("text", "")), n,
                                  variants=tuple(str(v) for v in variants)))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise SdloomError(f"{meta}: row {n + 1}: bad row ({e})") from None
    else:
        for p in sorted(root.rglob("*")):
            if p.suffix.lower() in EXTS and not p.name.startswith("."):
                cap = p.with_suffix(".txt")
                text = cap.read_text(encoding="utf-8").strip() if cap.exists() else ""
                items.append(Item(p, text))
    if not items:
        raise SdloomError(f"no training images in {root} (expected images with .txt captions "
                          "or a metadata.jsonl)")
    return items


def npy_cache(root: Path) -> np.ndarray | None:
    """images.npy ([rows, H, W, 3] uint8, one per metadata.jsonl row), memory-mapped, when it
    exists and is not older than metadata.jsonl."""
    cache, meta = root / "images.npy", root / "metadata.jsonl"
    if not (cache.exists() and meta.exists()) or cache.stat().st_mtime < meta.stat().st_mtime:
        return None
    try:
        arr = np.load(cache, mmap_mode="r")
    except (OSError, ValueError):
        return None
    rows = sum(1 for ln in meta.read_text(encoding="utf-8").splitlines() if ln.strip())
    if arr.ndim != 4 or arr.shape[0] != rows or arr.shape[3] != 3 or arr.dtype != np.uint8:
        return None
    return arr


def bucket_sizes(resolution: int, step: int = 64) -> list[tuple[int, int]]:
    """Aspect-ratio buckets (w, h) of at most resolution² pixels, sides multiples of `step`,
    aspect ratios up to 2:1 (as kohya's defaults)."""
    area, out = resolution * resolution, set()
    for w in range(step, resolution * 2 + 1, step):
        h = area // w // step * step
        if h >= step and max(w / h, h / w) <= 2.0:
            out.add((w, h))
    return sorted(out)


def nearest_bucket(w: int, h: int, sizes: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket closest in log aspect ratio (ties: the larger area)."""
    ar = math.log(w / h)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ar), -s[0] * s[1]))


def load_rgb(path: Path) -> Image.Image:
    """RGB image; transparency is composited onto white (as emoji and icons expect)."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA", "P", "PA"):
                rgba = im.convert("RGBA")
                bg = Image.new("RGB", im.size, (255, 255, 255))
                bg.paste(rgba, mask=rgba.split()[-1])
                return bg
            return im.convert("RGB")
    except OSError as e:
        raise SdloomError(f"cannot read training image {path}: {e}") from None


def cover(img: Image.Image, w: int, h: int) -> Image.Image:
    """Resize so the image covers (w, h) — the shorter side fits — keeping its aspect ratio."""
    scale = max(w / img.width, h / img.height)
    size = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    return img if size == img.size else img.resize(size, Image.LANCZOS)


def crop(arr: np.ndarray, w: int, h: int, where: tuple[float, float]) -> np.ndarray:
    """A (w, h) window of an [H, W, 3] array; `where` places it in the free room (0.5 = centre)."""
    dx, dy = arr.shape[1] - w, arr.shape[0] - h
    x0, y0 = round(dx * where[0]), round(dy * where[1])
    return arr[y0:y0 + h, x0:x0 + w]


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Images resized on the shorter side and cropped to the training size (or their bucket),
    as [3, H, W] float tensors in [-1, 1], with captions; keys are (index, augmentation seed).
    `window` > 0: each sample is a random window×window square of that image instead (the
    upscalers' training: super-resolution is local), cut before the pixels become floats."""

    def __init__(self, root: str | Path, resolution: int, *, buckets: bool = False,
                 bucket_step: int = 64, random_crop: bool = False, flip: bool = False,
                 caption_dropout: float = 0.0, include_holdout: bool = False,
                 keep_in_memory: bool | None = None, caption_templates: tuple[str, ...] = (),
                 caption_variants: bool = False, window: int = 0):
        self.root = Path(root)
        self.templates = tuple(caption_templates)
        self.variants = caption_variants
        self.items = read_items(self.root, include_holdout)
        self.random_crop, self.flip, self.caption_dropout = random_crop, flip, caption_dropout
        self.npy = npy_cache(self.root) if self.items[0].row >= 0 else None
        sizes = (bucket_sizes(resolution, min(bucket_step, resolution)) if buckets
                 else [(resolution, resolution)])
        for it in self.items:
            it.size = nearest_bucket(*self._source_size(it), sizes) if buckets else sizes[0]
        self.window = window
        if window and min(min(it.size) for it in self.items) < window:
            raise SdloomError(f"a {window}-pixel training window does not fit in "
                              f"{resolution}-pixel images")
        if keep_in_memory is None:  # uncropped (random-crop) images are larger: a rough 1.8×
            est = sum(w * h * 3 for w, h in (it.size for it in self.items))
            keep_in_memory = self.npy is None and est * (1.8 if random_crop else 1) < MEMORY_BUDGET
        self._mem: list[np.ndarray] | None = None
        if keep_in_memory:
            self._mem = [self._prepare(i) for i in range(len(self.items))]

    def _source_size(self, it: Item) -> tuple[int, int]:
        if self.npy is not None:
            return self.npy.shape[2], self.npy.shape[1]
        try:
            with Image.open(it.path) as im:
                return im.size
        except OSError as e:
            raise SdloomError(f"cannot read training image {it.path}: {e}") from None

    def _prepare(self, i: int) -> np.ndarray:
        """Resized (not yet cropped unless the crop is always centred) uint8 [H, W, 3]."""
        it = self.items[i]
        w, h = it.size
        if self.npy is not None:
            arr = np.asarray(self.npy[it.row])
            if arr.shape[:2] == (h, w):
                return arr
            img = Image.fromarray(arr)
        else:
            img = load_rgb(it.path)
        arr = np.asarray(cover(img, w, h))
        return arr if self.random_crop else np.ascontiguousarray(crop(arr, w, h, (0.5, 0.5)))

    def __len__(self) -> int:
        return len(self.items)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [it.size for it in self.items]

    def augment(self, aug_seed: int) -> Augment:
        """The draws always happen in one order, so turning an option on changes nothing else."""
        r = random.Random(aug_seed)
        flip, cx, cy, drop, tpl = r.random(), r.random(), r.random(), r.random(), r.random()
        variant, wx, wy = r.random(), r.random(), r.random()
        return Augment(self.flip and flip < 0.5,
                       (cx, cy) if self.random_crop else (0.5, 0.5),
                       drop < self.caption_dropout,
                       int(tpl * len(self.templates)) if self.templates else 0,
                       variant if self.variants else 0,
                       (wx, wy) if self.window else (0.5, 0.5))

    def image(self, i: int, aug: Augment | None = None) -> torch.Tensor:
        """[3, H, W] float in [-1, 1]."""
        arr = self._mem[i] if self._mem is not None else self._prepare(i)
        w, h = self.items[i].size
        arr = crop(arr, w, h, aug.crop if aug else (0.5, 0.5))
        if aug is not None and aug.flip:
            arr = arr[:, ::-1]
        if self.window:
            arr = crop(arr, self.window, self.window, aug.window if aug else (0.5, 0.5))
        x = torch.from_numpy(np.array(arr)).permute(2, 0, 1)  # a writable copy
        return x.float() / 127.5 - 1.0

    def caption(self, i: int, aug: Augment | None = None) -> str:
        """The caption (or, with caption_variants, one of the row's variants), empty when
        dropped, put into a template (`"a {}"`) when the set has templates (the sample's draw
        picks one; no augmentation: the plain caption)."""
        if aug is not None and aug.drop_caption:
            return ""
        it = self.items[i]
        text = it.text
        if aug is not None and self.variants and it.variants and aug.variant >= 0.5:
            # caption_variants: half the draws keep the caption, half take a variant uniformly
            text = it.variants[min(int((aug.variant - 0.5) * 2 * len(it.variants)),
                                   len(it.variants) - 1)]
        if aug is None or not self.templates:
            return text
        return self.templates[aug.template].replace("{}", text)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        i, seed = (key, None) if isinstance(key, int) else key
        aug = self.augment(seed) if seed is not None else None
        return {"pixels": self.image(i, aug), "caption": self.caption(i, aug), "index": i,
                "flip": bool(aug and aug.flip)}


def collate(samples: list[dict]) -> dict:
    """A batch of dataset samples: pixels [B, 3, H, W], captions, index and flip tensors."""
    return {"pixels": torch.stack([s["pixels"] for s in samples]),
            "captions": [s["caption"] for s in samples],
            "index": torch.tensor([s["index"] for s in samples]),
            "flip": torch.tensor([s["flip"] for s in samples])}


class BatchSampler:
    """Seeded, sharded, resumable batches of (index, augmentation seed) keys.

    Each epoch is a permutation seeded by (seed, epoch); indices are grouped by bucket into
    whole batches whose order is shuffled again; rank r of `world` takes every world-th batch
    (as DistributedSampler does for samples), all ranks the same number."""

    def __init__(self, sizes: list[tuple[int, int]], batch_size: int, seed: int,
                 rank: int = 0, world: int = 1):
        self.sizes, self.batch_size, self.seed = sizes, batch_size, seed
        self.rank, self.world = rank, world
        self._cache: tuple[int, list] | None = None
        if len(self) == 0:
            raise SdloomError(f"{len(sizes)} images (per bucket) are fewer than one batch of "
                              f"{batch_size} × {world} processes")

    def epoch(self, e: int) -> list[list[tuple[int, int]]]:
        """This rank's batches of epoch `e`."""
        if self._cache is not None and self._cache[0] == e:
            return self._cache[1]
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + e)
        perm = torch.randperm(len(self.sizes), generator=g).tolist()
        aug = torch.randint(0, 2 ** 62, (len(self.sizes),), generator=g).tolist()
        groups: dict[tuple[int, int], list[int]] = {}
        for i in perm:
            groups.setdefault(self.sizes[i], []).append(i)
        out = []
        for size in sorted(groups):
            idx = groups[size]
            out += [[(i, aug[i]) for i in idx[k:k + self.batch_size]]
                    for k in range(0, len(idx) - self.batch_size + 1, self.batch_size)]
        out = [out[i] for i in torch.randperm(len(out), generator=g).tolist()]
        mine = out[self.rank:len(out) // self.world * self.world:self.world]
        self._cache = (e, mine)
        return mine

    def __len__(self) -> int:
        """Batches per epoch on each rank (independent of the epoch)."""
        counts: dict[tuple[int, int], int] = {}
        for s in self.sizes:
            counts[s] = counts.get(s, 0) + 1
        return sum(n // self.batch_size for n in counts.values()) // self.world

    def from_position(self, m: int) -> Iterator[list[tuple[int, int]]]:
        """Every batch from micro-batch number `m` on, across epochs, without end."""
        e, i = divmod(m, len(self))
        while True:
            batches = self.epoch(e)
            yield from batches[i:]
            e, i = e + 1, 0


@torch.no_grad()
def encode_latents(model, ds: ImageCaptionDataset, device: torch.device,
                   amp: torch.dtype | None = None, bs: int = 32) -> list[list[torch.Tensor]]:
    """Latent caching: posterior-mean latents (· scale) of every image through `model`'s frozen
    VAE, as [plain views, mirrored views] when the set flips."""
    vae = model.first_stage_model
    views = [False, True] if ds.flip else [False]
    out: list[list[torch.Tensor]] = [[None] * len(ds) for _ in views]  # type: ignore[list-item]
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(ds.sizes):
        by_size.setdefault(s, []).append(i)
    for v, mirrored in enumerate(views):
        aug = Augment(mirrored, (0.5, 0.5), False)
        for idx in by_size.values():
            for k in range(0, len(idx), bs):
                chunk = idx[k:k + bs]
                x = torch.stack([ds.image(i, aug) for i in chunk]).to(device)
                with torch.autocast(device.type, dtype=amp or torch.float32,
                                    enabled=amp is not None):
                    z = vae.latent_from_image(x).float().cpu()
                for i, zi in zip(chunk, z):
                    out[v][i] = zi
    return out


def micro_batches(ds: ImageCaptionDataset, sampler: BatchSampler, start: int,
                  cache: list[list[torch.Tensor]] | None = None, num_workers: int = 0,
                  pin: bool = False) -> Iterator[dict]:
    """Micro-batches from micro-batch number `start` on: cached latents (with captions), or
    images through a DataLoader (workers see only keys, so their number changes nothing)."""
    if cache is not None:
        for keys in sampler.from_position(start):
            augs = [(i, ds.augment(s)) for i, s in keys]
            yield {"latents": torch.stack([cache[int(a.flip)][i] for i, a in augs]),
                   "captions": [ds.caption(i, a) for i, a in augs]}
        return
    yield from torch.utils.data.DataLoader(ds, batch_sampler=sampler.from_position(start),
                                           collate_fn=collate, num_workers=num_workers,
                                           pin_memory=pin)
