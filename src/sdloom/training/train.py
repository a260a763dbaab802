"""`sdloom train`: VAE, U-Net (eps/v), U-Net + text encoder from scratch, or LoRA.

Images → VAE latents; noise at a uniformly drawn timestep; the U-Net predicts the noise (or v);
MSE (optionally min-SNR weighted). Deterministic data order and RNG make `--resume` continue the
exact run; under torchrun the same command trains with DDP.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.save import save_model, save_safetensors
from ..config import PRESETS as MODEL_PRESETS
from ..errors import SdloomError
from ..models.sd import LatentDiffusion
from ..sampling.schedules import DiscreteSchedule
from ..tokenizer import get_tokenizer
from .config import PRESETS, TrainConfig
from .data import ImageCaptionSet
from .distributed import Dist, init_distributed, shutdown
from .ema import EMA
from .lora_train import inject_lora, lora_state_dict


def init_from_scratch(model: LatentDiffusion) -> None:
    """Zero the last layer of every residual branch of the U-Net (as LDM does), so a fresh
    U-Net starts as a near-identity and trains stably."""
    u = model.unet
    with torch.no_grad():
        nn.init.zeros_(u.out[2].weight)
        nn.init.zeros_(u.out[2].bias)
        for m in u.modules():
            if hasattr(m, "out_layers"):
                nn.init.zeros_(m.out_layers[3].weight)
                nn.init.zeros_(m.out_layers[3].bias)
            if hasattr(m, "proj_out") and hasattr(m, "transformer_blocks"):
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
        for te in model.text_encoders:
            for name, p in te.named_parameters():
                if "token_embedding" in name or "position" in name:
                    p.normal_(0, 0.02)


def build_model(cfg: TrainConfig, device: torch.device) -> LatentDiffusion:
    if cfg.model in MODEL_PRESETS:
        torch.manual_seed(cfg.seed)
        model = LatentDiffusion(MODEL_PRESETS[cfg.model])
        init_from_scratch(model)
        model = model.to(device)
    else:
        from ..checkpoints.load import load_model
        model = load_model(cfg.model, device=device).model
    if cfg.vae_from:
        from ..checkpoints.load import load_model
        src = load_model(cfg.vae_from, device=device).model
        model.first_stage_model.load_state_dict(src.first_stage_model.state_dict())
    if model.config.is_sdxl:
        raise SdloomError("training SDXL models is not supported yet (SD1/SD2-style only)")
    model.requires_grad_(False)
    return model


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017) for the optional VAE adversarial term."""

    def __init__(self, ch: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 2, ch * 4, 4, 2, 1), nn.GroupNorm(8, ch * 4), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 4, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Trainee(nn.Module):
    """The trained computation as one module (what DDP wraps): batch → loss."""

    def __init__(self, model: LatentDiffusion, cfg: TrainConfig, schedule: DiscreteSchedule):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.register_buffer("ac", schedule.alphas_cumprod.float(), persistent=False)

    def vae_loss(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        vae = self.model.first_stage_model
        mean, logvar = vae.encode(x)
        z = mean + torch.exp(0.5 * logvar) * eps
        rec = vae.decode(z)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()
        return F.l1_loss(rec, x) + self.cfg.kl_weight * kl, rec

    def diffusion_loss(self, x0: torch.Tensor, ids: torch.Tensor, t: torch.Tensor,
                       noise: torch.Tensor) -> torch.Tensor:
        context = self.model.text_encoders[0](ids)[0]
        a = self.ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = self.model.unet(x_t, t, context).float()
        target = noise if self.cfg.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
        loss = (pred - target).pow(2).flatten(1).mean(1)
        if self.cfg.min_snr_gamma > 0:
            snr = (a / (1 - a)).flatten()
            w = snr.clamp(max=self.cfg.min_snr_gamma) / (snr if self.cfg.prediction == "eps"
                                                          else snr + 1)
            loss = loss * w
        return loss.mean()

    def forward(self, *args):
        if self.cfg.what == "vae":
            return self.vae_loss(*args)
        return self.diffusion_loss(*args)


def lr_factor(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min(p, 1.0)))
    if cfg.schedule == "linear":
        return max(0.0, 1 - p)
    return 1.0


class Logger:
    """Scalars to TensorBoard when it is installed, always to metrics.jsonl."""

    def __init__(self, out: Path, enabled: bool):
        self.enabled = enabled
        self.file = open(out / "metrics.jsonl", "a") if enabled else None
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(out / "tensorboard"))
            except Exception:  # tensorboard is optional
                self.tb = None

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.tb:
            self.tb.close()


def _encode_all(model, ds: ImageCaptionSet, device, flip: bool, bs: int = 32) -> torch.Tensor:
    """Latents of every image (posterior mean · scale), and of the mirrored images if flipping."""
    vae = model.first_stage_model
    outs = []
    for mirrored in ([False, True] if flip else [False]):
        lat = []
        for i in range(0, len(ds), bs):
            idx = list(range(i, min(i + bs, len(ds))))
            fl = torch.full((len(idx),), mirrored)
            with torch.no_grad():
                lat.append(vae.latent_from_image(ds.tensor(idx, fl).to(device)).float().cpu())
        outs.append(torch.cat(lat))
    return torch.stack(outs)  # [1 or 2, N, C, h, w]


def train(cfg: TrainConfig, data: Path, out: Path, resume: bool = False,
          progress: bool = True) -> dict:
    cfg.validate()
    d, device = init_distributed()
    try:
        return _train(cfg, data, out, resume, progress, d, device)
    finally:
        shutdown(d)


def _train(cfg, data, out, resume, progress, d: Dist, device) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state_dir = out / "state"
    if d.main:
        (out / "config.json").write_text(cfg.to_json())
    ds = ImageCaptionSet(data, cfg.resolution, buckets=cfg.buckets, random_crop=cfg.random_crop,
                         include_holdout=cfg.include_holdout, seed=cfg.seed)
    model = build_model(cfg, device)
    schedule = DiscreteSchedule.scaled_linear(model.config.num_timesteps,
                                              model.config.linear_start, model.config.linear_end)
    if cfg.prediction != model.config.prediction and cfg.what != "vae":
        model.config = model.config.replace(prediction=cfg.prediction)
    adapters = {}
    groups: list[dict] = []
    if cfg.what == "vae":
        model.first_stage_model.requires_grad_(True)
        groups.append({"params": list(model.first_stage_model.parameters()), "lr": cfg.lr})
    elif cfg.what == "lora":
        adapters = inject_lora(model.unet, cfg.lora_rank, cfg.lora_alpha)
        ps = [p for a in adapters.values() for p in (a.lora_down.weight, a.lora_up.weight)]
        for p in ps:
            p.requires_grad_(True)
        groups.append({"params": ps, "lr": cfg.lr})
    else:
        model.unet.requires_grad_(True)
        groups.append({"params": list(model.unet.parameters()), "lr": cfg.lr})
        if cfg.what == "full":
            te = model.text_encoders[0]
            te.requires_grad_(True)
            groups.append({"params": list(te.parameters()), "lr": cfg.text_lr or cfg.lr})
    model.unet.gradient_checkpointing = cfg.grad_checkpointing
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=(0.9, 0.999),
                            **({"fused": True} if device.type == "cuda" else {}))
    trainee = Trainee(model, cfg, schedule).to(device)
    module: nn.Module = trainee
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP
        module = DDP(trainee, device_ids=[d.local_rank] if device.type == "cuda" else None)
    disc = disc_opt = None
    if cfg.what == "vae" and cfg.adv_weight > 0:
        torch.manual_seed(cfg.seed + 1)
        disc = PatchDiscriminator().to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
    ema = EMA(model, cfg.ema_decay) if cfg.ema_decay > 0 else None
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)
    step = 0
    if resume:
        if not (state_dir / "trainer.pt").exists():
            raise SdloomError(f"--resume: no training state in {state_dir}")
        st = torch.load(state_dir / "trainer.pt", map_location="cpu", weights_only=True)
        from safetensors.torch import load_file
        raw = load_file(str(state_dir / "raw.safetensors"))
        own = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in raw.items():
                own[k].copy_(v)
        opt.load_state_dict(st["optimizer"])
        if ema is not None:
            ema.load_state_dict(st["ema"])
        if disc is not None and "disc" in st:
            disc.load_state_dict(st["disc"])
            disc_opt.load_state_dict(st["disc_optimizer"])
        gen.set_state(st["rng"][d.rank] if d.rank < len(st["rng"]) else st["rng"][0])
        step = int(st["step"])
    tok = get_tokenizer()
    pad = model.config.text_encoders[0].pad_token
    cached = None
    if cfg.what != "vae" and cfg.cache_latents and not cfg.buckets:
        cached = _encode_all(model, ds, device, cfg.flip)
    per_epoch = len(ds.batches(0, cfg.batch_size, cfg.seed, d.rank, d.world))
    if per_epoch == 0:
        raise SdloomError(f"{len(ds)} images are fewer than one batch of {cfg.batch_size} "
                          f"× {d.world} processes")
    epoch_cache: dict[int, list[list[int]]] = {}

    def micro_batch(m: int) -> list[int]:
        ep, i = divmod(m, per_epoch)
        if ep not in epoch_cache:
            epoch_cache.clear()
            epoch_cache[ep] = ds.batches(ep, cfg.batch_size, cfg.seed, d.rank, d.world)
        return epoch_cache[ep][i]

    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler("cuda") if amp is torch.float16 and device.type == "cuda" \
        else None
    logger = Logger(out, d.main)
    bar = None
    if progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True)
    losses: list[float] = []
    t0, seen = time.perf_counter(), 0
    module.train()
    while step < cfg.steps:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(cfg, step)
        total = 0.0
        for k in range(cfg.grad_accum):
            idx = micro_batch(step * cfg.grad_accum + k)
            b = len(idx)
            flip = (torch.rand(b, generator=gen) < 0.5) if cfg.flip else torch.zeros(b, dtype=bool)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                if cfg.what == "vae":
                    x = ds.tensor(idx, flip).to(device)
                    eps = torch.randn((b, model.config.vae.embed_dim, x.shape[2] // 8,
                                       x.shape[3] // 8), generator=gen).to(device)
                    loss, rec = module(x, eps)
                    if disc is not None and step >= cfg.adv_start:
                        loss = loss - cfg.adv_weight * disc(rec).mean()
                else:
                    if cached is not None:
                        x0 = cached[flip.long(), torch.tensor(idx)].to(device)
                    else:
                        with torch.no_grad():
                            x0 = model.first_stage_model.latent_from_image(
                                ds.tensor(idx, flip).to(device)).float()
                    caps = ds.captions(idx)
                    drop = torch.rand(b, generator=gen) < cfg.caption_dropout
                    caps = ["" if dr else c for c, dr in zip(caps, drop.tolist())]
                    ids = tok(caps, pad_token=pad).to(device)
                    t = torch.randint(0, len(schedule.alphas_cumprod), (b,), generator=gen)
                    noise = torch.randn(x0.shape, generator=gen)
                    if cfg.offset_noise:
                        noise = noise + cfg.offset_noise * torch.randn(
                            (b, x0.shape[1], 1, 1), generator=gen)
                    loss = module(x0, ids, t.to(device), noise.to(device))
            loss = loss / cfg.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            total += float(loss.detach())
            seen += b * d.world
        if scaler:
            scaler.unscale_(opt)
        params = [p for g in opt.param_groups for p in g["params"]]
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        if disc is not None and step >= cfg.adv_start:
            _disc_step(disc, disc_opt, model, ds, micro_batch(step * cfg.grad_accum), device, gen)
        if ema is not None:
            ema.update(model)
        step += 1
        total = d.mean(total)
        losses.append(total)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.4f}", lr=f"{opt.param_groups[0]['lr']:.2e}")
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.log(step, loss=total, lr=opt.param_groups[0]["lr"], grad_norm=gnorm,
                       images_per_s=seen / (time.perf_counter() - t0))
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(out, cfg, model, adapters, opt, ema, gen, step, d, disc, disc_opt)
        if cfg.sample_every and step % cfg.sample_every == 0 and d.main and cfg.what != "vae":
            save_samples(out, cfg, model, ema, step)
    if bar is not None:
        bar.close()
    logger.close()
    d.barrier()
    return {"losses": losses, "step": step, "images_per_s": seen / (time.perf_counter() - t0)}


def _disc_step(disc, disc_opt, model, ds, idx, device, gen):
    """Hinge loss on real images against fresh reconstructions."""
    x = ds.tensor(idx).to(device)
    with torch.no_grad():
        mean, _ = model.first_stage_model.encode(x)
        rec = model.first_stage_model.decode(mean)
    loss = F.relu(1 - disc(x)).mean() + F.relu(1 + disc(rec)).mean()
    disc_opt.zero_grad(set_to_none=True)
    loss.backward()
    disc_opt.step()


def save_checkpoint(out: Path, cfg, model, adapters, opt, ema, gen, step, d: Dist,
                    disc=None, disc_opt=None) -> None:
    """model.safetensors (EMA weights when EMA is on), and state/ for an exact resume.
    Every file is written atomically; trainer.pt goes last and marks the state complete."""
    import torch.distributed as dist
    rngs = [gen.get_state()]
    if d.enabled:  # each rank's data RNG, gathered so a resume restores all of them
        states = [None] * d.world
        dist.all_gather_object(states, gen.get_state())
        rngs = states
    if not d.main:
        return
    state_dir = out / "state"
    state_dir.mkdir(parents=True, exist_ok=True)
    trained = {k: v for k, v in model.named_parameters() if v.requires_grad}
    save_safetensors(trained, state_dir / "raw.safetensors")
    meta = {"sdloom_step": str(step)}
    if adapters:
        save_safetensors(lora_state_dict(adapters), out / "lora.safetensors",
                         {"ss_network_dim": str(cfg.lora_rank),
                          "ss_network_alpha": str(cfg.lora_alpha), **meta})
    else:
        backup = ema.copy_to(model) if ema is not None else None
        save_model(model, model.config, out / "model.safetensors", dtype=torch.float32,
                   extra_metadata=meta)
        if backup is not None:
            ema.restore(model, backup)
    st = {"step": step, "optimizer": opt.state_dict(), "rng": rngs}
    if ema is not None:
        st["ema"] = ema.state_dict()
    if disc is not None:
        st["disc"] = disc.state_dict()
        st["disc_optimizer"] = disc_opt.state_dict()
    from ..checkpoints.save import _atomic
    _atomic(state_dir / "trainer.pt", lambda tmp: torch.save(st, tmp))


def save_samples(out: Path, cfg, model, ema, step: int) -> None:
    """A grid of images from the fixed sample prompts (EMA weights when EMA is on)."""
    from ..images import image_grid
    from ..infotext import save_png
    from ..pipelines.engine import Engine
    from ..pipelines.generate import generate
    from ..pipelines.params import GenerationParams
    backup = ema.copy_to(model) if ema is not None else None
    was = model.training
    model.eval()
    try:
        eng = Engine(model)
        imgs = []
        for i, p in enumerate(cfg.sample_prompts):
            imgs += generate(eng, GenerationParams(prompt=p, seed=i, steps=cfg.sample_steps,
                                                   width=cfg.resolution,
                                                   height=cfg.resolution)).images
        save_png(image_grid(imgs), out / "samples" / f"step-{step:06d}.png",
                 " | ".join(cfg.sample_prompts))
    finally:
        model.train(was)
        if backup is not None:
            ema.restore(model, backup)


# ------------------------------------------------------------------ command line

FLAGS = ["what", "model", "vae_from", "steps", "batch_size", "grad_accum", "lr", "precision",
         "save_every", "sample_every", "ema_decay", "prediction", "resolution", "seed",
         "lora_rank", "lora_alpha"]


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="images + .txt captions, or metadata.jsonl")
    p.add_argument("--output", required=True, help="output folder (model, state, samples)")
    p.add_argument("--config", help="a JSON file of TrainConfig fields")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe")
    p.add_argument("--resume", action="store_true", help="continue from OUTPUT/state")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field")
    p.add_argument("--no-progress", action="store_true")
    defaults = TrainConfig()
    for f in FLAGS:
        p.add_argument("--" + f.replace("_", "-"), dest=f, default=None,
                       type=type(getattr(defaults, f)) if getattr(defaults, f) is not None
                       else str)
    p.set_defaults(func=run_train)


def config_from_args(a) -> TrainConfig:
    cfg = TrainConfig()
    if a.resume and (Path(a.output) / "config.json").exists() and not a.config:
        cfg = TrainConfig.load(Path(a.output) / "config.json")
    if a.preset:
        cfg = cfg.override(PRESETS[a.preset])
    if a.config:
        cfg = cfg.override(json.loads(Path(a.config).read_text()))
    over = {f: getattr(a, f) for f in FLAGS if getattr(a, f) is not None}
    for kv in a.set:
        if "=" not in kv:
            raise SdloomError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        over[k] = v
    return cfg.override(over)


def run_train(a) -> int:
    cfg = config_from_args(a)
    res = train(cfg, Path(a.data), Path(a.output), resume=a.resume, progress=not a.no_progress)
    if res["losses"]:
        print(f"trained {res['step']} steps; last loss {res['losses'][-1]:.4f}; "
              f"{res['images_per_s']:.1f} images/s → {a.output}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdloom.training.train")
    add_train_args(ap)
    a = ap.parse_args(argv)
    try:
        return run_train(a)
    except SdloomError as e:
        print(f"sdloom: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
