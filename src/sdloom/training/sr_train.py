"""`sdloom train --what esrgan`: an ESRGAN-family super-resolution network (models/esrgan.py)
trained on pixels. Each sample is one random `x4_crop`² window of a training image (cut by the
data set before its pixels become floats), made `scale`× smaller as the x4 upscaler's
training does (`low_res_of`: antialiased bicubic, 8-bit levels); the network's output in
[0, 1] is fitted to the window: L2 (`rec_loss=l2`, what PSNR measures) or L1. There is no autoencoder in the path, so nothing bounds the result but
the network. The output, `model.safetensors`, is in BasicSR's key layout: the upscaler
registry, A1111 and Real-ESRGAN's own code all read it. Resumable and DDP-ready as the other
runs (state.py, distributed.py); data order and crops are functions of the seed and step.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.save import save_safetensors
from ..errors import SdloomError
from ..families.x4_upscaler import low_res_of
from ..io import atomic_write_text
from ..models import esrgan
from .config import TrainConfig
from .data import BatchSampler, ImageCaptionDataset, micro_batches
from .distributed import Dist, wrap_ddp
from .ema import EMA
from .state import claim_output, clean_leftovers, publish_state
from .train import DTYPES, gather_rng, load_checkpoint, one_network_loop, trainer_state

# the embedded upscaler (docs/embedded-model.md): Real-ESRGAN's compact net at 48 features and
# 12 body convs, 0.27 M parameters
PRESETS: dict[str, esrgan.Config] = {
    "emoji-esrgan-x4": esrgan.CompactConfig(nf=48, num_conv=12, scale=4),
}


def build_network(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """A fresh seeded network of a preset, or an upscaler file to fine-tune; trainable."""
    if cfg.model in PRESETS:
        torch.manual_seed(cfg.seed)
        net = esrgan.build(PRESETS[cfg.model])
    elif Path(cfg.model).is_file():
        net = esrgan.load_upscaler(cfg.model)
    else:
        raise SdloomError(f"what=esrgan: model {cfg.model!r} is neither an upscaler preset "
                          f"({', '.join(sorted(PRESETS))}) nor an ESRGAN-family file")
    return net.to(device).train().requires_grad_(True)


def check_sizes(cfg: TrainConfig, scale: int) -> int:
    """The high-res window side (x4_crop, or the whole image); it must divide by the factor."""
    crop = cfg.x4_crop or cfg.resolution
    if crop % scale:
        raise SdloomError(f"x4_crop (or resolution) must be a multiple of the network's "
                          f"factor {scale}, not {crop}")
    return crop


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Images [B, C, H, W] blurred by a Gaussian of `sigma` pixels (reflected borders; the
    kernel reaches 3σ); sigma 0 returns them unchanged."""
    if sigma <= 0:
        return x
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    g = torch.exp(-t * t / (2 * sigma * sigma))
    g = (g / g.sum()).to(x.device, x.dtype)
    c = x.shape[1]
    y = F.pad(x, (r, r, r, r), mode="reflect")
    y = F.conv2d(y, g.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(y, g.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def blurred(high: torch.Tensor, sigma_max: float, gen: torch.Generator) -> torch.Tensor:
    """Each image blurred by its own σ drawn uniformly from [0, sigma_max] (from `gen`): the
    degradation `blur_max` adds before the downscale, so the network learns to sharpen
    softer inputs than a clean bicubic one."""
    if sigma_max <= 0:
        return high
    sigmas = (torch.rand(len(high), generator=gen) * sigma_max).tolist()
    return torch.cat([gaussian_blur(x[None], s) for x, s in zip(high, sigmas)])


def reconstruction(cfg: TrainConfig, out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (F.mse_loss if cfg.rec_loss == "l2" else F.l1_loss)(out.float(), target.float())


def train_upscaler(cfg: TrainConfig, data: Path, out: Path, resume: bool, progress: bool,
                   stop_after: int | None, d: Dist, device: torch.device) -> dict:
    """The loop of train.train for what=esrgan; returns the same dict."""
    out.mkdir(parents=True, exist_ok=True)
    state = claim_output(out, cfg, resume)
    if d.main:
        clean_leftovers(out)
    net = build_network(cfg, device)
    scale = net.config.scale
    crop = check_sizes(cfg, scale)
    ds = ImageCaptionDataset(data, cfg.resolution, random_crop=cfg.random_crop, flip=cfg.flip,
                             include_holdout=cfg.include_holdout, window=crop)
    sampler = BatchSampler(ds.sizes, cfg.batch_size, cfg.seed, d.rank, d.world)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.adam_betas),
                            **({"fused": True} if device.type == "cuda" else {}))
    ema = EMA(net, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    scaler = torch.amp.GradScaler(device.type) if cfg.precision == "fp16" else None
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)  # blur strengths
    step = 0
    if state is not None:
        step = load_checkpoint(state, cfg, net, opt, ema, scaler, None, None, gen, d)
    module = wrap_ddp(net, d, device)
    batches = micro_batches(ds, sampler, step * cfg.grad_accum, None, cfg.num_workers,
                            pin=device.type == "cuda")
    if d.main:
        atomic_write_text(out / "config.json", cfg.to_json())

    def micro() -> tuple[torch.Tensor, int]:
        high = next(batches)["pixels"].to(device, non_blocking=True)
        with torch.autocast(device.type, enabled=False):  # inputs in fp32, as evaluation's
            low = (low_res_of(blurred(high, cfg.blur_max, gen), scale) + 1) / 2
        return reconstruction(cfg, module(low), (high + 1) / 2), len(high)

    res = one_network_loop(cfg, out, d, device, step=step, stop_after=stop_after,
                           progress=progress, desc="train esrgan", unit="images",
                           module=module, trained=net, opt=opt, ema=ema, scaler=scaler,
                           micro=micro,
                           save=lambda n: _save(out, cfg, net, opt, ema, scaler, gen, n, d))
    return {**res, "model": net}


def _save(out: Path, cfg: TrainConfig, net: nn.Module, opt, ema: EMA | None, scaler,
          gen: torch.Generator, step: int, d: Dist) -> None:
    """model.safetensors (the EMA weights when EMA is on, BasicSR keys) atomically, then the
    training state."""
    rngs = gather_rng(gen, d)
    if not d.main:
        return
    meta = {"sdloom_step": str(step), "sdloom_train": cfg.to_json()}
    backup = ema.copy_to(net) if ema is not None else None
    try:
        save_safetensors({k: v.to(DTYPES[cfg.save_dtype]) for k, v in net.state_dict().items()},
                         out / "model.safetensors", meta)
    finally:
        if backup is not None:
            ema.restore(net, backup)
    publish_state(out, step, dict(net.named_parameters()),
                  trainer_state(step, d, opt, rngs, ema, scaler), cfg)
