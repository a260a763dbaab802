"""Edge agreement of a canny ControlNet: does the output follow the condition's edges?

For N images of a data set (half evenly spaced over its held-out rows, which neither the model
nor the ControlNet trained on, half over the others; reported apart) the canny map
of the image (sdloom's `controlnet.canny`, the extension's 100/200 thresholds, at the model's
size) is the condition. Each prompt is generated twice with the same seed, with and without the
ControlNet (module none: the map as it is), and the canny map of each output is compared with
the condition: precision = output edge pixels within `--tolerance` pixels of a condition edge,
recall = condition edge pixels within that distance of an output edge, F1. Prompts (`--prompts`):
`other`, another picked image's caption (the control has to override what the prompt draws: the
test of following the edges), `own`, the image's own caption (a model that has learnt its data
set redraws that image anyway, so this measures agreement more than control), `empty`. Prints
JSON with the means per prompt kind, with and without control. Runs on CUDA and on the CPU.

Usage: python bench/eval_control.py [--controlnet FILE] [--model FILE] [--data data/emoji128]
       [--n 64] [--steps 20] [--prompts empty,own,other] [--grid grid.png]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from sdloom.controlnet import BUILTIN, ControlUnit, canny
from sdloom.pipelines.engine import Engine
from sdloom.pipelines.generate import generate
from sdloom.pipelines.params import GenerationParams
from sdloom.training.data import cover, crop, load_rgb, npy_cache


def pick_rows(data: Path, n: int) -> list[tuple[int, dict]]:
    """(row, record): n/2 evenly spaced held-out rows (fewer if there are fewer), the rest
    evenly spaced training rows."""
    rows = [json.loads(ln) for ln in (data / "metadata.jsonl").read_text(encoding="utf-8")
            .splitlines() if ln.strip()]
    held = [(i, r) for i, r in enumerate(rows) if r.get("holdout")]
    rest = [(i, r) for i, r in enumerate(rows) if not r.get("holdout")]

    def spaced(xs: list, k: int) -> list:
        return [xs[j * len(xs) // k] for j in range(k)] if k > 0 and xs else []
    h = spaced(held, min(len(held), n // 2))
    return h + spaced(rest, min(len(rest), n - len(h)))


def source(data: Path, row: int, rec: dict, size: int) -> Image.Image:
    """The row's image at size × size (resized and centre-cropped as training does); from the
    PNG, or from images.npy when the folder has only that."""
    p = data / rec["file_name"]
    img = load_rgb(p) if p.exists() else Image.fromarray(np.asarray(npy_cache(data)[row]))
    return Image.fromarray(np.ascontiguousarray(crop(np.asarray(cover(img, size, size)),
                                                     size, size, (0.5, 0.5))))


def agreement(out: np.ndarray, cond: np.ndarray, tol: int) -> tuple[float, float, float]:
    """(precision, recall, F1) of boolean edge maps with a tolerance of `tol` pixels."""
    st = ndimage.generate_binary_structure(2, 2)  # 8-connected: a square of side 2·tol + 1

    def near(e: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(e, st, iterations=tol) if tol > 0 else e
    p = float((out & near(cond)).sum() / out.sum()) if out.any() else 0.0
    r = float((cond & near(out)).sum() / cond.sum()) if cond.any() else 0.0
    return p, r, 2 * p * r / (p + r) if p + r > 0 else 0.0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--controlnet", default=str(BUILTIN["sdloom-emoji-canny"]))
    ap.add_argument("--model", default=None, help="default: the embedded model")
    ap.add_argument("--data", default="data/emoji128")
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=7.0)
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--tolerance", type=int, default=1, help="pixels (dilation radius)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prompts", default="empty,own,other",
                    help="comma list of empty, own, other")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--grid", help="also write 8 evenly spaced picks (first prompt kind) as "
                                   "rows of condition | without | with control")
    a = ap.parse_args(argv)
    kinds = [k.strip() for k in a.prompts.split(",") if k.strip()]
    if not kinds or set(kinds) - {"other", "own", "empty"}:
        ap.error("--prompts takes a comma list of other, own, empty")
    if not Path(a.controlnet).exists():
        print(f"eval_control: no ControlNet file {a.controlnet}", file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    eng = Engine.load(a.model, device=a.device, precision=a.precision)
    size = eng.config.default_size
    picked = pick_rows(Path(a.data), a.n)
    scores: dict[tuple[str, str, str], list[tuple[float, float, float]]] = {}
    tiles = []
    for k, (row, rec) in enumerate(picked):
        cond = canny(np.asarray(source(Path(a.data), row, rec, size)), 100, 200)
        hint = Image.fromarray(np.repeat(cond[..., None], 3, axis=2))
        unit = ControlUnit(a.controlnet, hint, module="none", weight=a.weight, resize_mode=0)
        # `other`: the caption of the picked image half the list away (another kind of emoji)
        prompts = {"own": rec["text"], "empty": "",
                   "other": picked[(k + len(picked) // 2) % len(picked)][1]["text"]}
        for kind in kinds:
            base = dict(prompt=prompts[kind], seed=a.seed + k, steps=a.steps, cfg_scale=a.cfg,
                        sampler_name=a.sampler, width=size, height=size)
            row_tiles = [hint]
            for name, units in (("without_control", []), ("with_control", [unit])):
                img = generate(eng, GenerationParams(**base, controlnets=units)).images[0]
                edges = canny(np.asarray(img.convert("RGB")), 100, 200) > 0
                group = "held_out" if rec.get("holdout") else "training"
                for g in (group, "all"):
                    scores.setdefault((kind, g, name), []).append(
                        agreement(edges, cond > 0, a.tolerance))
                row_tiles.append(img)
            if a.grid and k % max(1, len(picked) // 8) == 0 and kind == kinds[0]:
                tiles.append(row_tiles)
    out: dict = {"n": len(picked), "controlnet": Path(a.controlnet).name,
                 "data": str(a.data), "steps": a.steps, "cfg": a.cfg, "sampler": a.sampler,
                 "weight": a.weight, "tolerance_px": a.tolerance, "device": str(eng.device),
                 "seconds": round(time.perf_counter() - t0, 1)}
    for (kind, group, name), s in scores.items():
        m = np.asarray(s).mean(axis=0)
        out.setdefault(f"prompt_{kind}", {}).setdefault(group, {"n": len(s)})[name] = {
            "precision": round(float(m[0]), 4), "recall": round(float(m[1]), 4),
            "f1": round(float(m[2]), 4)}
    if a.grid and tiles:
        from sdloom.images import image_grid
        image_grid([t.convert("RGB") for r in tiles for t in r], rows=len(tiles)).save(a.grid)
        out["grid"] = a.grid
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
