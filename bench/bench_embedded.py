"""Seconds per image of the embedded model at its defaults (128², 20 steps DPM++ 2M Karras, CFG 7)
— sdloom vs diffusers' StableDiffusionPipeline on the same weights, same run, same machine.

Usage: python bench/bench_embedded.py [--runs 5] [--threads N]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0)
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    from sdloom.pipelines.engine import EMBEDDED_MODEL, Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    t = time.perf_counter()
    eng = Engine.load(None, device="cpu", precision="fp32")
    load = time.perf_counter() - t
    p = dict(prompt="a red apple", steps=20, cfg_scale=7.0, sampler_name="DPM++ 2M", seed=1)
    generate(eng, GenerationParams(**p))  # warm-up
    t = time.perf_counter()
    for i in range(a.runs):
        generate(eng, GenerationParams(**{**p, "seed": i}))
    ours = (time.perf_counter() - t) / a.runs
    print(f"sdloom: {ours:.3f} s/image (model load {load:.2f} s, torch threads "
          f"{torch.get_num_threads()})")
    try:
        import diffusers
        import transformers
    except ImportError:
        print("diffusers not installed: no comparison")
        return
    from sdloom.checkpoints.save import convert
    from sdloom.tokenizer import get_tokenizer
    folder = tempfile.mkdtemp() + "/emoji"
    convert(EMBEDDED_MODEL, folder)
    clip_tok = get_tokenizer()  # the same vocabulary and merge ranks, handed to transformers
    pairs = [tuple(m.split()) for m in sorted(clip_tok.ranks, key=clip_tok.ranks.get)]
    tok = transformers.CLIPTokenizer(vocab=clip_tok.encoder, merges=pairs, model_max_length=77)
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        use_karras_sigmas=True, algorithm_type="dpmsolver++", final_sigmas_type="zero",
        prediction_type="v_prediction" if eng.config.prediction == "v" else "epsilon")
    pipe = diffusers.StableDiffusionPipeline(
        vae=diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae",
                                                    torch_dtype=torch.float32),
        text_encoder=transformers.CLIPTextModel.from_pretrained(
            folder, subfolder="text_encoder", torch_dtype=torch.float32),
        tokenizer=tok, unet=diffusers.UNet2DConditionModel.from_pretrained(
            folder, subfolder="unet", torch_dtype=torch.float32),
        scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a red apple", num_inference_steps=20, guidance_scale=7.0, height=128,
              width=128)
    pipe(**kw, generator=torch.Generator().manual_seed(0))
    t = time.perf_counter()
    for i in range(a.runs):
        pipe(**kw, generator=torch.Generator().manual_seed(i))
    ref = (time.perf_counter() - t) / a.runs
    print(f"diffusers: {ref:.3f} s/image; ratio sdloom/diffusers = {ours / ref:.2f}")


if __name__ == "__main__":
    main()
