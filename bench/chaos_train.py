"""Chaos test of training saves: SIGKILL `sdloom train` at random moments, resume, compare.

A tiny model is trained (CPU, one thread, a state saved every step so that many kills land
inside a save) once without interruption, and once with N random SIGKILLs (each process is
killed at a random moment after it has logged a new step), each followed by `--resume` (or a
restart when no state was saved yet), until the run completes. Prints JSON:
{kills, kills_with_leftovers (killed inside a save, judged by the temp files it left),
resumes_ok, resumes_failed, leftovers (temp files at the end), final_equal_uninterrupted
(model file and logged losses bit-equal to the uninterrupted run), seconds}.

Usage: python bench/chaos_train.py [--kills 8] [--steps 40] [--seed 0] [--keep DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from sdloom.checkpoints.save import save_model
from sdloom.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdloom.families.sd import LatentDiffusion

TINY = ModelConfig(
    "sd1",
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
               transformer_depth_middle=1, num_heads=2, context_dim=32, num_groups=8),
    VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, num_groups=8),
    (TextEncoderConfig(width=32, layers=2, heads=2),), default_size=64, name="")


def make_data(root: Path) -> Path:
    root.mkdir(parents=True)
    for i, (name, rgb) in enumerate([("red", (220, 30, 30)), ("green", (30, 180, 60)),
                                     ("blue", (40, 60, 220)), ("yellow", (240, 220, 30))]):
        for shape in ("square", "circle"):
            im = Image.new("RGB", (32, 32), "white")
            draw = ImageDraw.Draw(im)
            (draw.rectangle if shape == "square" else draw.ellipse)((6, 6, 26, 26), fill=rgb)
            im.save(root / f"{name}-{shape}.png")
            (root / f"{name}-{shape}.txt").write_text(f"a {name} {shape}")
    return root


def command(data: Path, init: Path, out: Path, steps: int, resume: bool) -> list[str]:
    exe = Path(sys.executable).with_name("sdloom")
    head = [str(exe), "train"] if exe.exists() else [sys.executable, "-m",
                                                     "sdloom.training.train"]
    return head + ["--data", str(data), "--output", str(out), "--model", str(init),
                   "--what", "unet", "--resolution", "32", "--batch-size", "4", "--steps",
                   str(steps), "--warmup", "2", "--lr", "2e-3", "--ema-decay", "0.9",
                   "--save-every", "1", "--log-every", "1", "--caption-dropout", "0",
                   "--device", "cpu", "--no-progress", "--seed", "3"] \
        + (["--resume"] if resume else [])


def rows(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_bytes().splitlines())
    except OSError:
        return 0


def leftovers(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in out.rglob("*")
                  if "tmp" in p.name or ".del-" in p.name or ".old-" in p.name)


def losses(out: Path) -> dict[int, float]:
    out_rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in out_rows}  # the last row of each step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=8)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", help="work in this folder and keep it (default: a temp folder)")
    a = ap.parse_args()
    rng = random.Random(a.seed)
    root = Path(a.keep or tempfile.mkdtemp(prefix="sdloom-chaos-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    data = make_data(root / "data")
    torch.manual_seed(0)
    init = root / "init.safetensors"
    save_model(LatentDiffusion(TINY), TINY, init)

    ref = root / "ref"
    start = time.perf_counter()
    subprocess.run(command(data, init, ref, a.steps, False), env=env, check=True,
                   capture_output=True)
    per_step = (time.perf_counter() - start) / a.steps  # an upper bound: start-up included

    out = root / "chaos"
    kills = with_leftovers = ok = failed = 0
    errors: list[str] = []
    first = True
    while True:
        resume = (out / "states").is_dir() and any(
            p.name.startswith("step-") for p in (out / "states").iterdir())
        proc = subprocess.Popen(command(data, init, out, a.steps, resume), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        killed, seen = False, rows(out)
        if kills < a.kills:
            while proc.poll() is None and rows(out) <= seen:  # wait until it trains a step
                time.sleep(0.01)
            time.sleep(rng.uniform(0, 2 * per_step))
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills, killed = kills + 1, True
                with_leftovers += bool(leftovers(out))
        if not killed and proc.wait() != 0:
            failed += 1
            errors.append(proc.stderr.read().decode(errors="replace")[-500:])
            break
        ok += not first  # it resumed (or restarted) and trained on
        first = False
        if not killed:
            break
    from safetensors.torch import load_file
    equal = False
    if (out / "model.safetensors").exists() and not failed:
        wa = load_file(str(ref / "model.safetensors"))
        wb = load_file(str(out / "model.safetensors"))
        equal = (wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
                 and losses(ref) == losses(out))
    print(json.dumps({"kills": kills, "kills_with_leftovers": with_leftovers,
                      "resumes_ok": ok, "resumes_failed": failed,
                      "leftovers": leftovers(out), "final_equal_uninterrupted": equal,
                      "seconds": round(time.perf_counter() - t0, 1), "errors": errors}))
    if not a.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
