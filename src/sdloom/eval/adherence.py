"""Prompt adherence of a model on its own data set: generate each caption, find the nearest
data-set image, count how often it is the captioned one (top-1 identity).

The prompt need not be the training caption: `prompts` picks, per emoji, the caption, its CLDR
short name alone, each of its aliases alone, or each of its CLDR keywords alone (everyday
prompts the model was not trained on verbatim). A prompt counts as a hit when the nearest
image is one of the emoji that prompt belongs to (a keyword such as "fruit" names several).

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
from ..training.emoji_data import TONES

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


def distances(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """[Q, B] squared Euclidean distances."""
    return (queries ** 2).sum(1)[:, None] - 2 * queries @ bank.T + (bank ** 2).sum(1)[None]


def nearest(queries: np.ndarray, bank: np.ndarray) -> np.ndarray:
    """Index of the nearest bank row for each query (squared Euclidean distance)."""
    return distances(queries, bank).argmin(1)


@dataclass
class Entry:
    file: Path
    text: str
    holdout: bool
    codepoints: str = ""


PROMPT_KINDS = ("caption", "name", "alias", "keyword")
# Debian's unicode-cldr-core: CLDR's English emoji annotations (keywords and short names)
CLDR_ANNOTATIONS = Path("/usr/share/unicode/cldr/common/annotations/en.xml")


def caption_parts(text: str) -> tuple[str, list[str], list[str]]:
    """'thumbs up, thumbs, dark skin tone' → ('thumbs up', ['thumbs'], ['dark skin tone']): the
    CLDR short name, aliases and skin tones of an emoji_data caption (its parts hold no commas)."""
    first, *rest = text.split(", ")
    return first, [p for p in rest if p not in TONES], [p for p in rest if p in TONES]


def _cp_key(codepoints: str) -> str:
    """'2764 FE0F' → '2764': CLDR annotates emoji without VS16."""
    return " ".join(c for c in codepoints.upper().split() if c != "FE0F")


def read_cldr_keywords(path: Path) -> dict[str, list[str]]:
    """CLDR annotations (`<annotation cp="🍎">apple | fruit | red</annotation>`) → keywords by
    codepoints without VS16 ('1F34E' → ['apple', 'fruit', 'red'])."""
    import xml.etree.ElementTree as ET
    if not Path(path).exists():
        raise SdloomError(f"{path}: no CLDR annotations file (Debian: apt-get install "
                          "unicode-cldr-core; or pass --keywords FILE)")
    out: dict[str, list[str]] = {}
    for a in ET.parse(path).getroot().iter("annotation"):
        if a.get("type") == "tts" or not a.get("cp") or not a.text:
            continue
        words = [w.strip() for w in a.text.split("|") if w.strip()]
        out[_cp_key(" ".join(f"{ord(c):X}" for c in a.get("cp")))] = words
    return out


def prompts_of(entry: Entry, kind: str, keywords: dict[str, list[str]] | None = None) -> list[str]:
    """The prompts that stand for one data-set emoji under `kind` (PROMPT_KINDS); toned forms keep
    their tones, so "thumbs up, dark skin tone" still names one image."""
    if kind == "caption":
        return [entry.text]
    name, aliases, tones = caption_parts(entry.text)
    if kind == "name":
        return [", ".join([name] + tones)]
    if kind == "alias":
        return [", ".join([a] + tones) for a in aliases]
    if kind == "keyword":
        # only what CLDR lists for this exact sequence: toned forms and flags have no entry
        return list((keywords or {}).get(_cp_key(entry.codepoints), []))
    raise SdloomError(f"prompts must be one of {', '.join(PROMPT_KINDS)}, not {kind!r}")


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
                                 bool(r.get("holdout", False)), str(r.get("codepoints", ""))))
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
             grid_path: Path | None = None, progress: bool = True, prompts: str = "caption",
             keywords: Path | None = None,
             splits: tuple[str, ...] = ("train", "holdout")) -> dict:
    """Top-1 identity on training emoji and on held-out compositions, prompted by `prompts`."""
    from ..images import image_grid
    from ..pipelines.generate import generate
    from ..pipelines.params import GenerationParams
    if prompts not in PROMPT_KINDS:
        raise SdloomError(f"prompts must be one of {', '.join(PROMPT_KINDS)}, not {prompts!r}")
    entries = read_dataset(data)
    kw = read_cldr_keywords(keywords or CLDR_ANNOTATIONS) if prompts == "keyword" else None
    per_entry = [prompts_of(e, prompts, kw) for e in entries]
    owners: dict[str, list[int]] = {}  # prompt → every emoji it stands for, over the whole set
    for i, ps in enumerate(per_entry):
        for p in ps:
            owners.setdefault(p, []).append(i)
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
        if split not in splits:
            continue
        # one job per distinct prompt, in data-set order (for captions: one per emoji, as before)
        jobs = list(dict.fromkeys(p for i in idx for p in per_entry[i]))
        hits, t0, found, misses = 0, time.perf_counter(), [], []
        for start in range(0, len(jobs), batch):
            chunk = jobs[start:start + batch]
            # one batch, one prompt per image: prompt k of the split gets seed + k (A1111's
            # batch seeds, continued across batches), so the numbers do not depend on `batch`
            imgs = generate(engine, GenerationParams(
                prompt=chunk[0], all_prompts=chunk, batch_size=len(chunk), steps=steps,
                cfg_scale=cfg, sampler_name=sampler, seed=seed + start)).images
            d = np.sqrt(np.maximum(distances(features(imgs), bank), 0))
            for p, row in zip(chunk, d):
                g = int(row.argmin())
                found.append(g)
                if g in owners[p]:
                    hits += 1
                else:
                    misses.append({"prompt": p, "nearest": entries[g].text,
                                   "distance_own": float(row[owners[p]].min()),
                                   "distance_nearest": float(row[g])})
            if len(shown) < 64:
                shown += imgs[:max(0, 64 - len(shown))]
            if progress:
                print(f"\r{split}: {start + len(chunk)}/{len(jobs)}  top-1 {hits}/"
                      f"{start + len(chunk)}", end="", flush=True)
        if progress and jobs:
            print()
        # worst first: the output farthest from every image its prompt stands for
        misses.sort(key=lambda m: -m["distance_own"])
        results[split] = {"n": len(jobs), "top1": hits / len(jobs) if jobs else float("nan"),
                          "emoji": sum(bool(per_entry[i]) for i in idx), "prompts": jobs,
                          "nearest": found, "misses": misses,
                          "seconds": time.perf_counter() - t0}
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
    p.add_argument("--grid", help="write a grid of the first 64 outputs to this PNG")
    p.add_argument("--batch", type=int, default=16, help="images generated at once (1..64)")
    p.add_argument("--device", default="auto")
    p.add_argument("--prompts", choices=PROMPT_KINDS, default="caption",
                   help="prompt per emoji: the training caption, its CLDR short name alone, each "
                        "alias alone, or each CLDR keyword alone (toned forms keep their tone)")
    p.add_argument("--keywords", help="CLDR annotations XML for --prompts keyword "
                                      f"(default {CLDR_ANNOTATIONS}, Debian unicode-cldr-core)")
    p.add_argument("--split", choices=("both", "train", "holdout"), default="both",
                   help="which emoji to evaluate: training ones, held-out compositions, or both")
    p.add_argument("--show-misses", type=int, default=10, metavar="N",
                   help="print the N misses whose output is farthest from its own image")
    p.set_defaults(func=run_eval)


def run_eval(args) -> int:
    from ..pipelines.engine import Engine
    torch.set_grad_enabled(False)
    engine = Engine.load(args.model, device=args.device, precision="auto")
    res = evaluate(engine, Path(args.data), limit=args.limit, steps=args.steps, cfg=args.cfg,
                   sampler=args.sampler, seed=args.seed, batch=args.batch,
                   grid_path=Path(args.grid) if args.grid else None, prompts=args.prompts,
                   keywords=Path(args.keywords) if args.keywords else None,
                   splits=("train", "holdout") if args.split == "both" else (args.split,))
    print(f"prompts: {args.prompts}")
    print(f"{'split':10} {'prompts':>7} {'emoji':>6} {'top-1':>7} {'seconds':>8}")
    for split, r in res.items():
        print(f"{split:10} {r['n']:7d} {r['emoji']:6d} {r['top1'] * 100:6.1f}% "
              f"{r['seconds']:8.1f}")
    for split, r in res.items():
        for m in r["misses"][:max(0, args.show_misses)]:
            print(f"miss ({split}): {m['prompt']!r} → {m['nearest']!r}  distance to its own "
                  f"{m['distance_own']:.1f}, to the nearest {m['distance_nearest']:.1f}")
    if args.grid:
        print(f"grid: {args.grid}")
    return 0
