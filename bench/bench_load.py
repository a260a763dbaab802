"""Load time and peak RSS for a full-size SD1.5 checkpoint (random weights), sdloom vs diffusers.

Writes a random-weight SD1.5 single file (fp16, ~2.1 GB) and the same weights as a diffusers
folder, then loads each in a fresh subprocess and prints seconds and peak RSS (VmHWM).
Usage: python bench/bench_load.py [--dir /tmp/sdloom-bench] [--preset sd1]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r"""
import json, sys, time
t = time.perf_counter()
kind, path = sys.argv[1], sys.argv[2]
import torch
if kind == "sdloom":
    from sdloom.checkpoints.load import load_model
    m = load_model(path, dtype=torch.float16).model
    n = sum(p.numel() for p in m.parameters())
else:
    import diffusers, transformers
    n = 0
    for sub, cls in (("unet", diffusers.UNet2DConditionModel), ("vae", diffusers.AutoencoderKL)):
        n += sum(p.numel() for p in cls.from_pretrained(path, subfolder=sub,
                 torch_dtype=torch.float16).parameters())
    te = transformers.CLIPTextModel.from_pretrained(path, subfolder="text_encoder",
                                                    torch_dtype=torch.float16)
    n += sum(p.numel() for p in te.parameters())
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec from the (large) parent process
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"seconds": time.perf_counter() - t, "params": n, "peak_rss_gb": hwm / 2**20}))
"""


def run(kind: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, kind, str(path)], capture_output=True,
                         text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin",
                                         **{k: v for k, v in __import__("os").environ.items()
                                            if k.startswith(("PYTHON", "OMP"))}})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dir", default="/tmp/sdloom-bench")
    ap.add_argument("--preset", default="sd1")
    a = ap.parse_args()
    import torch

    from sdloom.checkpoints.save import convert, save_model
    from sdloom.families.sd_presets import PRESETS
    from sdloom.families.sd import LatentDiffusion
    d = Path(a.dir)
    single = d / f"{a.preset}-random.safetensors"
    folder = d / f"{a.preset}-random-diffusers"
    if not single.exists():
        t = time.perf_counter()
        torch.manual_seed(0)
        m = LatentDiffusion(PRESETS[a.preset]).half()
        save_model(m, PRESETS[a.preset], single)
        del m
        print(f"wrote {single} ({single.stat().st_size / 1e9:.2f} GB) in "
              f"{time.perf_counter() - t:.1f} s")
    if not folder.exists():
        convert(single, folder)
    size = single.stat().st_size / 2**30
    rows = [("sdloom single file", run("sdloom", single)),
            ("sdloom diffusers folder", run("sdloom", folder)),
            ("diffusers from_pretrained", run("diffusers", folder))]
    print(f"checkpoint: {size:.2f} GiB fp16")
    print(f"{'loader':28} {'seconds':>8} {'peak RSS GiB':>13} {'RSS / file':>10}")
    for name, r in rows:
        print(f"{name:28} {r['seconds']:8.2f} {r['peak_rss_gb']:13.2f} "
              f"{r['peak_rss_gb'] / size:10.2f}")
    base = rows[2][1]
    print(f"ratio sdloom/diffusers: time {rows[0][1]['seconds'] / base['seconds']:.2f}, "
          f"peak RSS {rows[0][1]['peak_rss_gb'] / base['peak_rss_gb']:.2f}")


if __name__ == "__main__":
    main()
