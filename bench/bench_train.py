"""Training throughput of an SD1.5-size U-Net (random weights): images/s and MFU.

One step = the U-Net's forward and backward on noised latents (ε objective, MSE) and an AdamW
update, as `sdloom train` does with cached latents; the text context is random (a frozen text
encoder costs under 2% of the U-Net). bf16 autocast on CUDA, fp32 on CPU. FLOPs of one step are
counted with torch's FlopCounterMode; MFU = counted FLOPs × steps/s ÷ peak.

Usage: python bench/bench_train.py [--batch-size 8] [--latent 64] [--steps 10] [--warmup 3]
       [--device auto|cpu|cuda] [--precision bf16|fp16|fp32] [--grad-checkpointing]
       [--compile] [--channels-last] [--peak-tflops 989]
CPU defaults: 32×32 latents (256² images), batch 1, 1 warm-up + 2 timed steps.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from sdloom.config import UNetConfig
from sdloom.models.unet import UNetModel
from sdloom.sampling.schedules import DiscreteSchedule
from sdloom.training.objectives import diffusion_target

# dense bf16/fp16 tensor-core peaks (vendor sheets): SXM parts
PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "4090": 165.0}


def peak_for(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAKS_TFLOPS.items() if k in name), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--latent", type=int, help="latent side (64 = 512² images)")
    ap.add_argument("--steps", type=int, help="timed steps")
    ap.add_argument("--warmup", type=int, help="untimed steps (≥ 1; the first counts FLOPs)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--precision", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    ap.add_argument("--channels-last", action="store_true",
                    help="U-Net weights and latents in channels_last memory format")
    ap.add_argument("--peak-tflops", type=float, help="peak of the device for MFU")
    ap.add_argument("--threads", type=int, help="CPU threads")
    a = ap.parse_args()
    cuda = torch.cuda.is_available() and a.device != "cpu"
    dev = torch.device("cuda" if cuda else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    bs = a.batch_size or (8 if cuda else 1)
    side = a.latent or (64 if cuda else 32)
    steps = a.steps or (10 if cuda else 2)
    a.warmup = max(1, a.warmup or (3 if cuda else 1))
    precision = a.precision or ("bf16" if cuda else "fp32")
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(0)
    cfg = UNetConfig()  # SD1.5
    unet = UNetModel(cfg).to(dev).train()
    fmt = torch.channels_last if a.channels_last else torch.contiguous_format
    unet = unet.to(memory_format=fmt)
    unet.gradient_checkpointing = a.grad_checkpointing
    n_params = sum(p.numel() for p in unet.parameters())
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5, **({"fused": True} if cuda else {}))
    scaler = torch.amp.GradScaler(dev.type) if amp is torch.float16 else None
    fwd = torch.compile(unet) if a.compile else unet
    ac = DiscreteSchedule.scaled_linear().alphas_cumprod.float().to(dev)
    g = torch.Generator().manual_seed(0)
    x0 = (torch.randn(bs, 4, side, side, generator=g) * 0.8).to(dev, memory_format=fmt)
    ctx = torch.randn(bs, 77, cfg.context_dim, generator=g).to(dev)

    def step() -> torch.Tensor:
        t = torch.randint(0, 1000, (bs,), generator=g).to(dev)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        a_t = ac[t].view(-1, 1, 1, 1)
        with torch.autocast(dev.type, dtype=amp or torch.float32, enabled=amp is not None):
            pred = fwd(a_t.sqrt() * x0 + (1 - a_t).sqrt() * noise, t, ctx)
        loss = F.mse_loss(pred.float(), diffusion_target(x0, noise, a_t, "eps"))
        (scaler.scale(loss) if scaler else loss).backward()
        if scaler:
            scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    # the first warm-up step also counts the FLOPs of a step (forward + backward; the
    # optimizer's elementwise work is not counted); it is never timed
    t_first = time.perf_counter()
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    for _ in range(a.warmup - 1):
        step()
    sync()
    t_warm = time.perf_counter() - t_first
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    sync()
    dt = (time.perf_counter() - t0) / steps
    peak = (a.peak_tflops or peak_for(dev) or 0.0) * 1e12
    where = torch.cuda.get_device_name(dev) if cuda else f"cpu ({torch.get_num_threads()} threads)"
    res = {"device": where,
           "unet_params_m": round(n_params / 1e6, 1), "batch": bs,
           "latent": side, "image": side * 8, "precision": precision,
           "grad_checkpointing": a.grad_checkpointing, "compile": a.compile,
           "channels_last": a.channels_last,
           "warmup_s": round(t_warm, 2), "step_s": round(dt, 4),
           "images_per_s": round(bs / dt, 3),
           "tflop_per_step": round(flops / 1e12, 3),
           "achieved_tflops": round(flops / dt / 1e12, 2),
           "mfu": round(flops / dt / peak, 4) if peak else None,
           "loss": round(float(loss), 4)}
    if cuda:
        res["peak_mem_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print(json.dumps(res))
    print(f"{res['images_per_s']:.3f} images/s ({bs} × {side * 8}², {precision}) on {where}; "
          f"{res['achieved_tflops']} TFLOP/s" +
          (f"; MFU {100 * res['mfu']:.1f}% of {peak / 1e12:.0f} TFLOP/s" if peak else
           "; MFU: pass --peak-tflops"))


if __name__ == "__main__":
    main()
