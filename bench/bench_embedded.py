"""Seconds per image of the embedded model at its defaults (128², 20 steps DPM++ 2M Karras, CFG 7)
— sdloom vs diffusers' StableDiffusionPipeline on the same weights, same run, same machine.

The tools alternate image by image (round k: one sdloom image, one diffusers image, the order
flipped every round), so a change in machine load lands on both; min and median per tool are
printed as JSON. Usage: python bench/bench_embedded.py [--rounds 9] [--threads N]
[--precision fp32|auto|bf16] [--compile] [--autocast] (--compile adds sdloom with torch.compile
as a tool, its first image, which compiles, reported apart; --autocast adds diffusers under
torch.autocast("cpu", bfloat16), its best CPU mode, on the same fp32 pipeline)
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "auto", "bf16"])
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--autocast", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    import diffusers

    from sdloom.checkpoints.save import convert
    from sdloom.pipelines.engine import EMBEDDED_MODEL, Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    t = time.perf_counter()
    eng = Engine.load(None, device="cpu", precision=a.precision)
    load = time.perf_counter() - t
    folder = tempfile.mkdtemp() + "/emoji"
    convert(EMBEDDED_MODEL, folder)  # a diffusers folder diffusers loads as it is
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, algorithm_type="dpmsolver++",
        final_sigmas_type="zero")
    pipe.set_progress_bar_config(disable=True)

    def ours(seed: int, engine=eng) -> None:
        generate(engine, GenerationParams(prompt="a red apple", steps=20, cfg_scale=7.0,
                                          sampler_name="DPM++ 2M", seed=seed))

    def theirs(seed: int) -> None:
        pipe(prompt="a red apple", num_inference_steps=20, guidance_scale=7.0, height=128,
             width=128, generator=torch.Generator().manual_seed(seed))

    tools = {"sdloom": ours, "diffusers": theirs}
    first = {}
    if a.compile:
        compiled = Engine.load(None, device="cpu", precision=a.precision, compile=True)
        tools["sdloom_compile"] = lambda seed: ours(seed, compiled)
    if a.autocast:
        def theirs_autocast(seed: int) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                theirs(seed)
        tools["diffusers_autocast"] = theirs_autocast
    for name, fn in tools.items():  # warm-up (compiles)
        t = time.perf_counter()
        fn(0)
        first[name] = round(time.perf_counter() - t, 2)
    times: dict[str, list[float]] = {k: [] for k in tools}
    for r in range(a.rounds):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for name in order:
            t = time.perf_counter()
            tools[name](r + 1)
            times[name].append(time.perf_counter() - t)
    out = {name: {"min_s": round(min(ts), 4), "median_s": round(statistics.median(ts), 4)}
           for name, ts in times.items()}
    out["ratio_min"] = round(out["sdloom"]["min_s"] / out["diffusers"]["min_s"], 3)
    out["ratio_median"] = round(out["sdloom"]["median_s"] / out["diffusers"]["median_s"], 3)
    if a.compile:
        out["ratio_min_compile"] = round(out["sdloom_compile"]["min_s"]
                                         / out["diffusers"]["min_s"], 3)
    if a.autocast:  # sdloom against diffusers' best CPU mode
        out["ratio_min_autocast"] = round(out["sdloom"]["min_s"]
                                          / out["diffusers_autocast"]["min_s"], 3)
        out["ratio_median_autocast"] = round(out["sdloom"]["median_s"]
                                             / out["diffusers_autocast"]["median_s"], 3)
    out.update(rounds=a.rounds, threads=torch.get_num_threads(), sdloom_load_s=round(load, 2),
               precision=a.precision, first_image_s=first)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
