"""Seconds per image, end to end (prompt → text encoder → 20 U-Net steps with CFG → VAE decode),
of an SD1.5-size model with random weights: sdloom vs diffusers' StableDiffusionPipeline on the
same weights (a diffusers folder that sdloom loads), same run, same device. Also peak GPU memory.

Usage: python bench/bench_generate.py [--runs 5] [--size 512] [--steps 20] [--device cuda]
       [--dtype fp16|bf16|fp32]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from gpu_parity import SD15_UNET, VAE  # same shapes as the parity bench (bench/ on sys.path)


def timed_runs(fn, runs: int, device: str) -> tuple[float, float]:
    """(seconds per call, peak GiB allocated) after one warm-up call."""
    fn(0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for i in range(runs):
        fn(i + 1)
    sync()
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device == "cuda" else float("nan")
    return (time.perf_counter() - t) / runs, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="fp16", choices=["fp16", "bf16", "fp32"])
    a = ap.parse_args()
    import diffusers
    import transformers

    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    from sdloom.tokenizer import get_tokenizer
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[a.dtype]
    torch.manual_seed(0)
    clip_tok = get_tokenizer()  # the CLIP vocabulary and merges, handed to transformers
    pairs = [tuple(m.split()) for m in sorted(clip_tok.ranks, key=clip_tok.ranks.get)]
    tok = transformers.CLIPTokenizer(vocab=clip_tok.encoder, merges=pairs, model_max_length=77)
    te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        hidden_act="quick_gelu", max_position_embeddings=77))
    sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                             beta_schedule="scaled_linear",
                                             timestep_spacing="trailing")
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL(**VAE), text_encoder=te, tokenizer=tok,
        unet=diffusers.UNet2DConditionModel(**SD15_UNET), scheduler=sched, safety_checker=None,
        feature_extractor=None, requires_safety_checker=False)
    for m in (pipe.unet, pipe.vae, pipe.text_encoder):  # random weights at a sane scale
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)
    folder = tempfile.mkdtemp() + "/sd15-random"
    pipe.save_pretrained(folder)
    pipe = pipe.to(a.device, dtype)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photograph of an astronaut riding a horse"

    def run_ref(i: int) -> None:
        g = torch.Generator(a.device).manual_seed(i)
        pipe(prompt, num_inference_steps=a.steps, guidance_scale=7.5, height=a.size,
             width=a.size, generator=g, output_type="pil")

    ref_s, ref_mem = timed_runs(run_ref, a.runs, a.device)
    pipe = None
    if a.device == "cuda":
        torch.cuda.empty_cache()
    eng = Engine.load(folder, device=a.device, precision=a.dtype)

    def run_ours(i: int) -> None:
        generate(eng, GenerationParams(prompt=prompt, steps=a.steps, cfg_scale=7.5,
                                       sampler_name="Euler", width=a.size, height=a.size,
                                       seed=i))

    ours_s, ours_mem = timed_runs(run_ours, a.runs, a.device)
    print(f"SD1.5-size {a.size}², {a.steps} steps Euler, CFG 7.5, {a.dtype}, {a.device}, "
          f"{a.runs} runs after a warm-up")
    print(f"diffusers: {ref_s:.3f} s/image, peak {ref_mem:.2f} GiB")
    print(f"sdloom:    {ours_s:.3f} s/image, peak {ours_mem:.2f} GiB")
    print(f"ratio sdloom/diffusers: time {ours_s / ref_s:.2f}, peak memory "
          f"{ours_mem / ref_mem:.2f}")


if __name__ == "__main__":
    main()
