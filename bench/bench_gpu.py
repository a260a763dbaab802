"""One GPU session's speed and memory measurements, sdloom vs diffusers on the same random
weights in the same process (issue: GPU fast path). Prints one JSON object per measurement and a
summary table last; with --out also writes them all to a JSON file.

Phases (--phases, comma-separated, run in the order given; each is skipped once --budget
seconds have passed, so the script ends inside a device lease):
  unet15   SD1.5 U-Net call, batch 2 (1 image + CFG), 64² latents, fp16: sdloom eager, sdloom
           CUDA graphs (the default fast path), diffusers eager; bit-equality graph vs eager
  image15  whole 512² image, 20 Euler steps, CFG 7.5: sdloom default (graphs) and eager,
           diffusers eager; time to first image (load + first generation, in-process), peak
           memory, pixel difference fast path vs eager path
  dcompile diffusers' best mode: its U-Net under torch.compile(mode="reduce-overhead"), call and
           whole image (compile time stated)
  ocompile sdloom --compile (inductor under our CUDA graphs), call and whole image
  sdxl     SDXL U-Net 128² batch 2, fp16: sdloom eager / graphs, diffusers eager; peak memory
  offload  SDXL-size model, 1024²: peak memory resident / --offload model / blocks; 2048²
           VAE decode with and without tiling
  train    SD1.5 U-Net training step (bench_train.py) eager vs fused/compiled variants

Usage: PYTHONPATH=src python bench/bench_gpu.py [--phases unet15,image15,...] [--budget 330]
       [--out results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from gpu_parity import SD15_UNET, SDXL_UNET, VAE  # noqa: E402

RESULTS: list[dict] = []
T0 = time.perf_counter()


def emit(**kw) -> dict:
    kw = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in kw.items()}
    RESULTS.append(kw)
    print(json.dumps(kw), flush=True)
    return kw


def cuda_ms(fn, iters: int = 30, warmup: int = 3) -> float:
    """Median milliseconds of fn() by CUDA events, after warm-up."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def wall_s(fn, runs: int) -> tuple[float, float]:
    """(median, min) seconds of fn(i) over runs, synchronised."""
    out = []
    for i in range(runs):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn(i)
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t)
    return statistics.median(out), min(out)


def peak_gib(base: int = 0) -> float:
    """Peak allocated GiB since the last reset, above `base` bytes that belong to others."""
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 30


def weights_bytes(*modules) -> int:
    return sum(t.numel() * t.element_size() for m in modules
               for t in [*m.parameters(), *m.buffers()])


def others_bytes(pipe) -> int:
    """Bytes allocated now that are not the diffusers pipeline's own weights."""
    return torch.cuda.memory_allocated() - weights_bytes(pipe.unet, pipe.vae, pipe.text_encoder)


def free() -> int:
    """Collect garbage (engines hold reference cycles) and return the bytes still allocated."""
    import gc
    gc.collect()
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated()


def scaled_random(*modules) -> None:
    """Random weights at a sane scale (as bench_generate), so images are not saturated."""
    with torch.no_grad():
        for m in modules:
            for p in m.parameters():
                if p.dim() > 1:
                    p.mul_(0.5)


class SD15:
    """A random SD1.5-size diffusers pipeline, saved as a folder sdloom loads."""

    def __init__(self, dtype):
        import diffusers
        import transformers

        from sdloom.tokenizer import get_tokenizer
        torch.manual_seed(0)
        clip_tok = get_tokenizer()
        pairs = [tuple(m.split()) for m in sorted(clip_tok.ranks, key=clip_tok.ranks.get)]
        tok = transformers.CLIPTokenizer(vocab=clip_tok.encoder, merges=pairs,
                                         model_max_length=77)
        with torch.device("cuda"):
            te = transformers.CLIPTextModel(transformers.CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, hidden_act="quick_gelu", max_position_embeddings=77))
            unet = diffusers.UNet2DConditionModel(**SD15_UNET)
            vae = diffusers.AutoencoderKL(**VAE)
        scaled_random(te, unet, vae)
        sched = diffusers.EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012,
                                                 beta_schedule="scaled_linear",
                                                 timestep_spacing="trailing")
        self.pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=te, tokenizer=tok, unet=unet, scheduler=sched,
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        self.folder = tempfile.mkdtemp() + "/sd15-random"
        self.pipe.save_pretrained(self.folder)
        self.pipe = self.pipe.to("cuda", dtype)
        self.pipe.set_progress_bar_config(disable=True)


PROMPT = "a photograph of an astronaut riding a horse"


def ref_image(pipe, i: int, steps: int = 20):
    g = torch.Generator("cuda").manual_seed(i)
    return pipe(PROMPT, num_inference_steps=steps, guidance_scale=7.5, height=512, width=512,
                generator=g, output_type="np").images[0]


def our_image(eng, i: int, steps: int = 20):
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    return generate(eng, GenerationParams(prompt=PROMPT, steps=steps, cfg_scale=7.5,
                                          sampler_name="Euler", width=512, height=512,
                                          seed=i)).images[0]


def unet_inputs(side: int, ctx_dim: int, dtype, sdxl: bool = False):
    g = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(2, 4, side, side, device="cuda", generator=g, dtype=dtype)
    t = torch.tensor([999.0, 999.0], device="cuda")
    ctx = torch.randn(2, 77, ctx_dim, device="cuda", generator=g, dtype=dtype)
    return x, t, ctx


@torch.no_grad()
def phase_unet15(st: dict, dtype) -> None:
    from sdloom.families.keymaps.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from sdloom.models.unet import UNetModel
    from sdloom.pipelines.fastpath import GraphedModel
    ref = st["sd15"].pipe.unet
    cfg = unet_config_from_diffusers(dict(ref.config))
    with torch.device("cuda"):
        ours = UNetModel(cfg)
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True)
    ours = ours.to(dtype).eval()
    st["unet15_ours"] = ours
    x, t, ctx = unet_inputs(64, 768, dtype)
    graphed = GraphedModel(ours)
    eager_out = ours(x, t, ctx)
    graph_out = graphed(x, t, ctx)  # capture
    graph_out = graphed(x, t, ctx)  # replay
    ms_e = cuda_ms(lambda: ours(x, t, ctx))
    ms_g = cuda_ms(lambda: graphed(x, t, ctx))
    ms_r = cuda_ms(lambda: ref(x, t, encoder_hidden_states=ctx))
    diff = (graph_out.float() - eager_out.float()).abs().max().item()
    ref_out = ref(x, t, encoder_hidden_states=ctx).sample
    emit(what="sd15 unet call b2 fp16", sdloom_eager_ms=ms_e, sdloom_graphs_ms=ms_g,
         diffusers_eager_ms=ms_r, graphs_over_diffusers_eager=ms_r / ms_g,
         graphs_vs_eager_max_abs=diff,
         ours_vs_diffusers_rel=((eager_out.float() - ref_out.float()).abs().max()
                                / ref_out.float().abs().max()).item())


def phase_image15(st: dict, dtype, runs: int) -> None:
    from sdloom.pipelines.engine import Engine
    import numpy as np
    pipe = st["sd15"].pipe
    ref_image(pipe, 0)
    base = others_bytes(pipe)
    torch.cuda.reset_peak_memory_stats()
    med_r, min_r = wall_s(lambda i: ref_image(pipe, i), runs)
    emit(what="sd15 512 image 20 steps: diffusers eager", median_s=med_r, min_s=min_r,
         own_peak_gib=peak_gib(base))
    st["diffusers_eager_image_s"] = med_r
    imgs = {}
    for mode, graphs in (("graphs", True), ("eager", False)):
        base = free()
        torch.cuda.synchronize()
        t = time.perf_counter()
        eng = Engine.load(st["sd15"].folder, device="cuda", precision="fp16",
                          cuda_graphs=graphs)
        imgs[mode] = np.asarray(our_image(eng, 0), dtype=np.int16)
        torch.cuda.synchronize()
        first = time.perf_counter() - t
        torch.cuda.reset_peak_memory_stats()
        med, mn = wall_s(lambda i: our_image(eng, i), runs)
        emit(what=f"sd15 512 image 20 steps: sdloom {mode}", median_s=med, min_s=mn,
             own_peak_gib=peak_gib(base), time_to_first_image_s=first,
             speedup_over_diffusers_eager=med_r / med)
        eng = None
        free()
    d = np.abs(imgs["graphs"] - imgs["eager"])
    emit(what="sd15 image: fast path vs eager path (uint8 pixels)", max_abs=int(d.max()),
         mean_abs=float(d.mean()))


def like_graph(net) -> tuple[list, dict]:
    """Arguments with the signature of the first call `net` (a GraphedModel) captured, so that
    timing it replays that graph."""
    args, kwargs = next(iter(net.graphs))
    make = lambda k: torch.randn(k[1], device=k[3]).to(k[2]) if k[0] == "T" else k[1]  # noqa
    pos = [make(k) for k in args]
    pos[1] = pos[1].abs() * 100  # timesteps
    return pos, {n: make(k) for n, k in kwargs}


def phase_compile(st: dict, dtype, runs: int, which: str) -> None:
    pipe = st["sd15"].pipe
    x, t, ctx = unet_inputs(64, 768, dtype)
    if which == "diffusers":
        unet = pipe.unet
        pipe.unet = torch.compile(unet, mode="reduce-overhead", fullgraph=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        ref_image(pipe, 0)  # compiles for the pipeline's own call signature
        ref_image(pipe, 1)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        base = others_bytes(pipe)
        torch.cuda.reset_peak_memory_stats()
        med, mn = wall_s(lambda i: ref_image(pipe, i), runs)
        t_step = pipe.scheduler.timesteps[0]
        with torch.no_grad():
            ms = cuda_ms(lambda: pipe.unet(x, t_step, encoder_hidden_states=ctx,
                                           return_dict=False))
        pipe.unet = unet
        st["diffusers_compiled_ms"], st["diffusers_compiled_image_s"] = ms, med
        emit(what="diffusers compiled (reduce-overhead)", first_two_images_s=compile_s,
             unet_call_ms=ms, it_per_s=1000 / ms, image_median_s=med, image_min_s=mn,
             own_peak_gib=peak_gib(base))
        return
    from sdloom.pipelines.engine import Engine
    base = free()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    eng = Engine.load(st["sd15"].folder, device="cuda", precision="fp16", compile=True)
    our_image(eng, 0)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    net = eng.denoiser.model  # GraphedModel over the compiled network
    with torch.no_grad():
        a_, k_ = like_graph(net)
        ms = cuda_ms(lambda: net(*a_, **k_))
    torch.cuda.reset_peak_memory_stats()
    med, mn = wall_s(lambda i: our_image(eng, i), runs)
    rec = dict(what="sdloom --compile (inductor + CUDA graphs)", time_to_first_image_s=first,
               unet_call_ms=ms, it_per_s=1000 / ms, image_median_s=med, image_min_s=mn,
               own_peak_gib=peak_gib(base), graphs_failed=net.failed)
    if "diffusers_compiled_ms" in st:
        rec["call_speedup_over_diffusers_compiled"] = st["diffusers_compiled_ms"] / ms
        rec["image_speedup_over_diffusers_compiled"] = st["diffusers_compiled_image_s"] / med
    emit(**rec)


@torch.no_grad()
def phase_sdxl(st: dict, dtype) -> None:
    import diffusers

    from sdloom.families.keymaps.unet import unet_config_from_diffusers, unet_diffusers_to_ldm
    from sdloom.models.unet import UNetModel, sdxl_adm
    from sdloom.pipelines.fastpath import GraphedModel
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = diffusers.UNet2DConditionModel(**SDXL_UNET).to(dtype).eval()
    cfg = unet_config_from_diffusers(dict(ref.config))
    with torch.device("cuda"):
        ours = UNetModel(cfg)
    ours.load_state_dict(unet_diffusers_to_ldm(ref.state_dict(), cfg), strict=True)
    ours = ours.to(dtype).eval()
    x, t, ctx = unet_inputs(128, 2048, dtype)
    pooled = torch.randn(2, 1280, device="cuda", dtype=dtype)
    ids = torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=dtype)
    y = sdxl_adm(pooled, (1024, 1024), (0, 0), (1024, 1024))
    extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}}
    graphed = GraphedModel(ours)
    e = ours(x, t, ctx, y=y)
    graphed(x, t, ctx, y=y)
    gout = graphed(x, t, ctx, y=y)
    ms_e = cuda_ms(lambda: ours(x, t, ctx, y=y), iters=15)
    ms_g = cuda_ms(lambda: graphed(x, t, ctx, y=y), iters=15)
    ms_r = cuda_ms(lambda: ref(x, t, encoder_hidden_states=ctx, **extra), iters=15)
    emit(what="sdxl unet call b2 1024 fp16", sdloom_eager_ms=ms_e, sdloom_graphs_ms=ms_g,
         diffusers_eager_ms=ms_r, graphs_over_diffusers_eager=ms_r / ms_g,
         graphs_vs_eager_max_abs=(gout.float() - e.float()).abs().max().item())


def phase_train(st: dict, budget: float, hard: float, names: list[str]) -> None:
    st.clear()
    torch.cuda.empty_cache()
    here = os.path.dirname(__file__)
    variants = {"eager": [], "channels_last": ["--channels-last"], "compile": ["--compile"],
                "compile_channels_last": ["--compile", "--channels-last"]}
    for name in names:
        flags = variants[name]
        left = hard - (time.perf_counter() - T0)
        if time.perf_counter() - T0 > budget or left < 30:
            emit(what=f"train {name}", skipped="budget")
            continue
        try:
            r = subprocess.run([sys.executable, os.path.join(here, "bench_train.py"),
                                "--device", "cuda", "--batch-size", "16", *flags],
                               capture_output=True, text=True, timeout=left)
        except subprocess.TimeoutExpired:
            emit(what=f"train {name}", skipped=f"timed out after {left:.0f} s")
            continue
        line = next((ln for ln in r.stdout.splitlines() if ln.startswith("{")), None)
        if line is None:
            emit(what=f"train {name}", error=(r.stderr or r.stdout)[-600:])
        else:
            emit(what=f"train {name}", **json.loads(line))


def phase_offload(st: dict, dtype) -> None:
    """SDXL-size model (random weights, sdloom only), 1024² txt2img, 4 Euler steps: peak GPU
    memory and seconds per image with the weights resident, --offload model, --offload blocks;
    and a 2048² VAE decode with and without tiling."""
    from sdloom.families.sd import LatentDiffusion
    from sdloom.families.sd_presets import PRESETS
    from sdloom.pipelines.engine import Engine
    from sdloom.pipelines.generate import generate
    from sdloom.pipelines.params import GenerationParams
    st.clear()
    free()

    def sdxl(device: str) -> LatentDiffusion:
        torch.manual_seed(0)
        with torch.device("cuda"):
            m = LatentDiffusion(PRESETS["sdxl-base"]).to(dtype).eval()
        scaled_random(m)
        return m.to(device)
    p = GenerationParams(prompt=PROMPT, steps=4, cfg_scale=7.0, sampler_name="Euler",
                         width=1024, height=1024, seed=1)
    for mode in ("none", "model", "blocks"):
        base = free()
        model = sdxl("cuda" if mode == "none" else "cpu")
        eng = Engine(model, offload=mode, offload_device="cuda")
        generate(eng, p)  # warm-up (graph capture for "none")
        torch.cuda.reset_peak_memory_stats()
        med, mn = wall_s(lambda i: generate(eng, p), 2)
        emit(what=f"sdxl 1024 4 steps offload={mode}", own_peak_gib=peak_gib(base),
             median_s=med)
        eng = model = None
    model = sdxl("cuda")
    eng = Engine(model, cuda_graphs=False)
    z = torch.randn(1, 4, 256, 256, device="cuda", dtype=dtype)
    for tiling in ("off", "on"):
        eng.vae_tiling = tiling
        base = free()
        torch.cuda.reset_peak_memory_stats()
        try:
            t = time.perf_counter()
            img = eng.decode(z)
            emit(what=f"vae decode 2048 tiling={tiling}", own_peak_gib=peak_gib(base),
                 seconds=time.perf_counter() - t, shape=list(img.shape))
        except torch.OutOfMemoryError as e:
            emit(what=f"vae decode 2048 tiling={tiling}", error=str(e)[:200])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--phases", default="unet15,image15,sdxl,train,dcompile,ocompile")
    ap.add_argument("--budget", type=float, default=330.0,
                    help="seconds after which remaining phases are skipped")
    ap.add_argument("--hard", type=float, default=400.0,
                    help="seconds by which the train phase's subprocesses must have ended")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--train", default="eager,channels_last,compile",
                    help="bench_train.py variants: eager, channels_last, compile, "
                         "compile_channels_last")
    ap.add_argument("--out")
    a = ap.parse_args()
    dtype = torch.float16
    emit(what="device", name=torch.cuda.get_device_name(), torch=torch.__version__)
    st: dict = {}
    for ph in a.phases.split(","):
        if time.perf_counter() - T0 > a.budget:
            emit(what=ph, skipped="budget")
            continue
        t = time.perf_counter()
        try:
            if ph in ("unet15", "image15", "dcompile", "ocompile") and "sd15" not in st:
                st["sd15"] = SD15(dtype)
            if ph == "unet15":
                phase_unet15(st, dtype)
            elif ph == "image15":
                phase_image15(st, dtype, a.runs)
            elif ph == "dcompile":
                phase_compile(st, dtype, a.runs, "diffusers")
            elif ph == "ocompile":
                phase_compile(st, dtype, a.runs, "sdloom")
            elif ph == "sdxl":
                phase_sdxl(st, dtype)
            elif ph == "offload":
                phase_offload(st, dtype)
            elif ph == "train":
                phase_train(st, a.budget, a.hard, a.train.split(","))
        except Exception as e:  # one broken phase must not lose the others' numbers
            import traceback
            emit(what=ph, error=f"{type(e).__name__}: {e}"[:800],
                 where=traceback.format_exc()[-1200:])
        emit(what=f"{ph} done", seconds=time.perf_counter() - t)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(RESULTS, f, indent=1)
    print("\nSUMMARY")
    for r in RESULTS:
        print(" | ".join(f"{k}={v}" for k, v in r.items() if k != "where"))


if __name__ == "__main__":
    main()
