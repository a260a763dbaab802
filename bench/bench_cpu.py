"""Seconds per image on the CPU: sdloom `--precision auto` (bf16 where the CPU has native bf16)
and fp32, against diffusers fp32 and diffusers under `torch.autocast("cpu", bfloat16)`, on
(a) the embedded model at its defaults (128², 20 steps DPM++ 2M Karras, CFG 7) and
(b) an SD1.5-shaped model with random weights (a diffusers folder both load), 256², 4 Euler
steps, CFG 7 — and stable-diffusion.cpp (`pip install stable-diffusion-cpp-python`, built from
source) on the same weights as one single file, when it is installed (`--sdcpp f32,q8_0`).

Tools alternate image by image (the order flipped every round) in one process, after one warm-up
image each, so a change in machine load lands on all of them; min and median per tool are printed
as JSON. Not one fresh process per image: load time and first-call costs are left out.

Usage: python bench/bench_cpu.py [--rounds-embedded 7] [--rounds-full 3] [--skip-full]
       [--threads N] [--sdcpp f32] [--only "sdloom auto,diffusers fp32,…"] (--only keeps those
       tools of the full-size run)
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from gpu_parity import SD15_UNET, VAE  # the full-size shapes (bench/ on sys.path)


def interleaved(tools: dict[str, Callable[[int], None]], rounds: int) -> dict:
    """Min and median seconds per call of each tool, tools alternating, order flipped per round."""
    for fn in tools.values():  # warm-up: oneDNN primitive caches, allocator
        fn(0)
    times: dict[str, list[float]] = {k: [] for k in tools}
    for r in range(rounds):
        order = list(tools) if r % 2 == 0 else list(reversed(tools))
        for name in order:
            t = time.perf_counter()
            tools[name](r + 1)
            times[name].append(time.perf_counter() - t)
    return {name: {"min_s": round(min(ts), 3), "median_s": round(statistics.median(ts), 3)}
            for name, ts in times.items()}


def ratios(out: dict, base: str = "diffusers fp32") -> dict:
    return {name: round(v["min_s"] / out[base]["min_s"], 3) for name, v in out.items()}


def sdloom_tools(path, params: dict) -> dict[str, Callable[[int], None]]:
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    tools = {}
    for prec in ("auto", "fp32"):
        eng = Engine.load(path, device="cpu", precision=prec)
        tools[f"sdloom {prec}"] = (
            lambda seed, eng=eng: generate(eng, GenerationParams(**params, seed=seed)))
    return tools


def diffusers_tools(pipe, kwargs: dict) -> dict[str, Callable[[int], None]]:
    def fp32(seed: int) -> None:
        pipe(**kwargs, generator=torch.Generator().manual_seed(seed))

    def bf16_autocast(seed: int) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pipe(**kwargs, generator=torch.Generator().manual_seed(seed))
    return {"diffusers fp32": fp32, "diffusers bf16 autocast": bf16_autocast}


def sdcpp_tools(path, kwargs: dict, wtypes: list[str]) -> dict[str, Callable[[int], None]]:
    """stable-diffusion.cpp on a single-file checkpoint, one tool per weight type (none when
    the package is not installed)."""
    try:
        from stable_diffusion_cpp import StableDiffusion
    except ImportError:
        return {}
    tools = {}
    for wtype in wtypes:
        sd = StableDiffusion(model_path=str(path), wtype=wtype,
                             n_threads=torch.get_num_threads(), verbose=False)
        tools[f"stable-diffusion.cpp {wtype}"] = (
            lambda seed, sd=sd: sd.generate_image(**kwargs, seed=seed))
    return tools


def embedded(rounds: int) -> dict:
    import diffusers

    from sdloom.checkpoints.save import convert
    from sdloom.pipelines.engine import EMBEDDED_MODEL
    folder = tempfile.mkdtemp() + "/emoji"
    convert(EMBEDDED_MODEL, folder)
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        pipe.scheduler.config, use_karras_sigmas=True, algorithm_type="dpmsolver++",
        final_sigmas_type="zero")
    pipe.set_progress_bar_config(disable=True)
    tools = sdloom_tools(None, dict(prompt="a red apple", steps=20, cfg_scale=7.0,
                                    sampler_name="DPM++ 2M"))
    tools |= diffusers_tools(pipe, dict(prompt="a red apple", num_inference_steps=20,
                                        guidance_scale=7.0, height=128, width=128))
    out = interleaved(tools, rounds)
    return {"times": out, "ratio_min_vs_diffusers_fp32": ratios(out), "rounds": rounds}


def full_size(rounds: int, sdcpp: list[str], only: list[str] | None) -> dict:
    import diffusers
    import transformers

    from sdloom.tokenizer import get_tokenizer
    torch.manual_seed(0)
    clip_tok = get_tokenizer()
    pairs = [tuple(m.split()) for m in sorted(clip_tok.ranks, key=clip_tok.ranks.get)]
    tok = transformers.CLIPTokenizer(vocab=clip_tok.encoder, merges=pairs, model_max_length=77)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", max_position_embeddings=77))
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear")
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**VAE), text_encoder=te, tokenizer=tok,
        unet=diffusers.UNet2DConditionModel(**SD15_UNET), scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    with torch.no_grad():  # random weights at a sane scale
        for m in (pipe.unet, pipe.vae, pipe.text_encoder):
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    folder = tempfile.mkdtemp() + "/sd15-random"
    pipe.save_pretrained(folder)
    del pipe
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photograph of an astronaut riding a horse"
    tools = sdloom_tools(folder, dict(prompt=prompt, steps=4, cfg_scale=7.0,
                                      sampler_name="Euler", width=256, height=256))
    tools |= diffusers_tools(pipe, dict(prompt=prompt, num_inference_steps=4, guidance_scale=7.0,
                                        height=256, width=256))
    if sdcpp:
        from sdloom.checkpoints.save import convert
        single = folder + ".safetensors"  # the same weights as one file, as sd.cpp reads them
        convert(folder, single)
        tools |= sdcpp_tools(single, dict(prompt=prompt, width=256, height=256, sample_steps=4,
                                          cfg_scale=7.0, sample_method="euler"), sdcpp)
    if only:
        tools = {k: v for k, v in tools.items() if k in only}
    out = interleaved(tools, rounds)
    return {"times": out, "ratio_min_vs_diffusers_fp32": ratios(out), "rounds": rounds}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds-embedded", type=int, default=7)
    ap.add_argument("--rounds-full", type=int, default=3)
    ap.add_argument("--skip-full", action="store_true")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--sdcpp", default="f32", help="stable-diffusion.cpp weight types ('' = "
                    "none)")
    ap.add_argument("--only", help="comma-separated tools of the full-size run to keep")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from sdloom.pipelines.engine import cpu_has_native_bf16, pick_dtype
    caps = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    res: dict = {
        "cpu": caps.get("cpu_name") or platform.processor(),
        "amx_bf16": caps.get("amx_bf16"), "avx512_bf16": caps.get("avx512_bf16"),
        "native_bf16": cpu_has_native_bf16(),
        "auto_dtype": str(pick_dtype("auto", torch.device("cpu"))).removeprefix("torch."),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
    }
    res["embedded_128_20steps_dpmpp2m"] = embedded(a.rounds_embedded)
    print(json.dumps(res), flush=True)
    if not a.skip_full:
        res["sd15_random_256_4steps_euler"] = full_size(
            a.rounds_full, [w for w in a.sdcpp.split(",") if w],
            [t.strip() for t in a.only.split(",")] if a.only else None)
        print(json.dumps(res))


if __name__ == "__main__":
    main()
