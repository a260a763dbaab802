"""Prompt adherence of a model on its own data set: generate each caption, find the nearest
data-set image, count how often it is the captioned one (top-1 identity).

Feature space (fixed, documented): each image is composited on white, resized to 32×32 with
Lanczos, converted to float RGB in [0, 1], flattened (3072 values); the distance is Euclidean.
For flat-shaded emoji on white this is a faithful, dependency-free identity measure.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import SdloomError

FEATURE_SIZE = 32


def features(images: list[Image.Image]) -> np.ndarray:
    """[N, 3072] float32 features: 32×32 Lanczos thumbnails on white."""
    out = np.empty((len(images), FEATURE_SIZE * FEATURE_SIZE * 3), dtype=np.float32)
    for i, im in enumerate(images):
        if im.mode in ("RGBA", "LA", "P"):
            bg = Image.new("RGB", im.size, (255, 255, 255))
            bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").split()[-1])
            im = bg
        im = im.convert("RGB").resize((FEATURE_SIZE, FEATURE_SIZE), Image.LANCZOS)
        out[i] = np.asarray(im, dtype=np.float32).reshape(-1) / 255.0
    return out


def nearest(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Index of the nearest bank row for each query (squared Euclidean distance)."""
    d = (queries ** 2).sum(1)[:, None] - 2 * queries @ bank.T + (bank ** 2).sum(1)[None]
    return d.argmin(1)


@dataclass
class Entry:
    file: Path
    text: str
    holdout: bool


def read_dataset(data: Path) -> list[Entry]:
    meta = data / "metadata.jsonl"
    if not meta.exists():
        raise SdloomError(f"{data}: no metadata.jsonl (build one with "
                          "`python -m sdloom.training.emoji_data DIR`)")
    out = []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if line.strip():
            try:
                r = json.loads(line)
                out.append(Entry(data / r["file_name"], str(r["text"]),
                                 bool(r.get("holdout", False))))
            except (ValueError, KeyError, TypeError) as e:
                raise SdloomError(f"{data.name}/metadata.jsonl line {n}: not a JSON object with "
                                  f"file_name and text ({type(e).__name__}: {e})") from None
    if not out:
        raise SdloomError(f"{data.name}/metadata.jsonl lists no images")
    return out


def reference_features(data: Path, entries: list[Entry]) -> np.ndarray:
    """Features of the data set's images: from the builder's images.npy (one row per metadata
    line) when it is fresh, else from the image files."""
    from ..training.data import npy_cache
    arr = npy_cache(data)
    if arr is not None and len(arr) == len(entries):
        return features([Image.fromarray(np.asarray(arr[i])) for i in range(len(entries))])
    return features([Image.open(e.file) for e in entries])


def evaluate(engine, data: Path, *, limit: int | None = None, steps: int = 20, cfg: float = 7.0,
             sampler: str = "DPM++ 2M", seed: int = 0, batch: int = 16,
             grid_path: Path | None = None, progress: bool = True) -> dict:
    """Top-1 identity on training captions and on held-out compositions."""
    from ..images import image_grid
    from ..pipelines.generate import generate
    from ..pipelines.params import GenerationParams
    entries = read_dataset(data)
    bank = reference_features(data, entries)
    train_idx = [i for i, e in enumerate(entries) if not e.holdout]
    held_idx = [i for i, e in enumerate(entries) if e.holdout]
    if limit is not None and limit < len(train_idx):  # an evenly spaced, deterministic subset
        train_idx = [train_idx[int(j * len(train_idx) / limit)] for j in range(limit)]
    if batch < 1:
        raise SdloomError(f"batch must be at least 1, not {batch}")
    results: dict = {}
    shown: list[Image.Image] = []
    for split, idx in (("train", train_idx), ("holdout", held_idx)):
        hits, t0, found = 0, time.perf_counter(), []
        for start in range(0, len(idx), batch):
            chunk = idx[start:start + batch]
            # one batch, one prompt per image: caption k of the split gets seed + k (A1111's
            # batch seeds, continued across batches), so the numbers do not depend on `batch`
            imgs = generate(engine, GenerationParams(
                prompt=entries[chunk[0]].text, all_prompts=[entries[i].text for i in chunk],
                batch_size=len(chunk), steps=steps, cfg_scale=cfg, sampler_name=sampler,
                seed=seed + start)).images
            got = nearest(features(imgs), bank)
            found += [int(g) for g in got]
            hits += int(sum(int(g) == i for g, i in zip(got, chunk)))
            if len(shown) < 64:
                shown += imgs[:max(0, 64 - len(shown))]
            if progress:
                print(f"\r{split}: {start + len(chunk)}/{len(idx)}  top-1 {hits}/"
                      f"{start + len(chunk)}", end="", flush=True)
        if progress and idx:
            print()
        results[split] = {"n": len(idx), "top1": hits / len(idx) if idx else float("nan"),
                          "nearest": found, "seconds": time.perf_counter() - t0}
    if grid_path is not None and shown:
        from ..infotext import save_png
        save_png(image_grid(shown), grid_path, None)
    return results


def add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model file (default: the embedded model)")
    p.add_argument("--data", required=True, help="data-set folder with metadata.jsonl")
    p.add_argument("--limit", type=int, help="evaluate this many training captions (evenly spaced)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=7.0)
    p.add_argument("--sampler", default="DPM++ 2M")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--grid", default="eval-grid.png", help="where to write a grid of outputs")
    p.add_argument("--batch", type=int, default=16, help="images generated at once (1..64)")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..pipelines.engine import Engine
    torch.set_grad_enabled(False)
    engine = Engine.load(args.model, device=args.device, precision="auto")
    res = evaluate(engine, Path(args.data), limit=args.limit, steps=args.steps, cfg=args.cfg,
                   sampler=args.sampler, seed=args.seed, batch=args.batch,
                   grid_path=Path(args.grid))
    print(f"{'split':10} {'n':>6} {'top-1':>7} {'seconds':>8}")
    for split, r in res.items():
        print(f"{split:10} {r['n']:6d} {r['top1'] * 100:6.1f}% {r['seconds']:8.1f}")
    print(f"grid: {args.grid}")
    return 0
