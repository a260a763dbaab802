"""`sdloom train`: VAE, denoiser (`what=unet`: the U-Net, or SD3's MMDiT), U-Net + text encoder
jointly (e.g. from scratch), or LoRA; ControlNets (controlnet_train.py) and ESRGAN-family
upscalers (`what=esrgan`, sr_train.py) and new words for a trained model's text encoder
(`what=words`, words_train.py) too.

Images → frozen VAE → latents (z − shift)·scale; noise at a drawn timestep; the denoiser's
objective is its family's (objectives.py, chosen once from `Family.model_sampling`): ε/v on the
DDPM table for SD1/SD2 (x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, MSE, optionally min-SNR-γ weighted; Ho et al.
2020; Salimans & Ho 2022; Hang et al. 2023), rectified flow for SD3 (x_t = (1 − σ)·x0 + σ·ε,
logit-normal σ with the model's shift, velocity target ε − x0; Esser et al. 2024). SD3's text
encoders stay frozen. Data order, augmentation and noise are functions of the seed and the step,
so `--resume` continues the exact run; under `torchrun` the same command trains with DDP.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..checkpoints.save import save_model, save_safetensors
from ..families.sd_presets import PRESETS as SD_PRESETS
from ..families.x4_upscaler import PRESETS as X4_PRESETS
from ..families.ldsr import PRESETS as LDSR_PRESETS
from ..families.x4_upscaler import LowResConditioning
from ..errors import SdloomError
from ..io import atomic_write_text
from ..families import family_of
from ..families.sd import LatentDiffusion
from ..sampling.model_sampling import DiscreteSampling
from .config import CHOICES, HELP, PRESETS, TrainConfig
from .controlnet_train import (ControlDataset, attach_controlnet, base_model_file,
                               control_batches, controlled_denoiser, controlnet_file)
from .data import BatchSampler, ImageCaptionDataset, encode_latents, micro_batches
from .distributed import Dist, checksum, init_distributed, shutdown, wrap_ddp
from .ema import EMA
from .lora_train import inject_lora, lora_metadata, lora_parameters, lora_state_dict
from .objectives import conditioning_for, objective_for
from .state import claim_output, clean_leftovers, load_state, publish_state, trim_log
from .vq_train import VQLoss

SampleFn = Callable[[nn.Module, list[str], int], list[Image.Image]]
MODEL_PRESETS = {**SD_PRESETS, **X4_PRESETS, **LDSR_PRESETS}
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


# ------------------------------------------------------------------ model and objective

def init_from_scratch(model: LatentDiffusion) -> None:
    """Zero the last layer of every residual branch of the U-Net (as LDM's `zero_module`), so
    a fresh U-Net starts near the identity; CLIP's 0.02-std embeddings for the text encoder."""
    u = model.unet
    with torch.no_grad():
        nn.init.zeros_(u.out[2].weight)
        nn.init.zeros_(u.out[2].bias)
        for m in u.modules():
            if hasattr(m, "out_layers"):
                nn.init.zeros_(m.out_layers[3].weight)
                nn.init.zeros_(m.out_layers[3].bias)
            if hasattr(m, "proj_out") and (hasattr(m, "transformer_blocks")
                                           or hasattr(m, "qkv")):  # LDSR's AttentionBlock
                nn.init.zeros_(m.proj_out.weight)
                nn.init.zeros_(m.proj_out.bias)
        for te in model.text_encoders:
            for name, p in te.named_parameters():
                if "token_embedding" in name or "position" in name:
                    p.normal_(0, 0.02)


def denoiser_net(model: nn.Module) -> nn.Module:
    """The denoiser network (U-Net or MMDiT): every family keeps it at model.diffusion_model."""
    return model.model.diffusion_model


def build_model(cfg: TrainConfig, device: torch.device) -> nn.Module:
    """A fresh seeded model of a preset, or a checkpoint; everything frozen to begin with."""
    from ..checkpoints.load import load_model
    if cfg.what in ("controlnet", "words"):  # made for (or taught to) a trained model
        model = load_model(base_model_file(cfg.model), device=device).model
    elif cfg.model in MODEL_PRESETS:
        torch.manual_seed(cfg.seed)
        preset = MODEL_PRESETS[cfg.model]
        model = family_of(preset).build(preset)
        init_from_scratch(model)
        model = model.to(device)
    elif Path(cfg.model).exists():
        model = load_model(cfg.model, device=device).model
    else:
        raise SdloomError(f"model {cfg.model!r} is neither a preset "
                          f"({', '.join(sorted(MODEL_PRESETS))}) nor a file")
    why = family_of(model.config).training_refusal(model.config, cfg.what)
    if why:
        raise SdloomError(why)
    if cfg.vae_from:  # the whole VAE with its config: its scale factor belongs to its weights
        src = load_model(cfg.vae_from, device=device).model
        model.first_stage_model = src.first_stage_model
        model.config = model.config.replace(vae=src.config.vae)
    if cfg.what != "vae" and cfg.prediction:
        sampling = family_of(model.config).model_sampling(model.config)
        if not isinstance(sampling, DiscreteSampling):
            raise SdloomError(f"prediction={cfg.prediction} is for eps/v models; this model "
                              "trains on the rectified-flow (velocity) objective: leave it unset")
        if cfg.prediction != sampling.prediction:
            if cfg.what in ("lora", "controlnet"):  # no objective of their own: the base's
                raise SdloomError(f"the base model predicts {sampling.prediction}; a "
                                  f"{cfg.what} for it cannot be trained on {cfg.prediction}")
            model.config = model.config.replace(prediction=cfg.prediction)  # saved with it
    model.requires_grad_(False)
    return model


def trainable(cfg: TrainConfig, model: nn.Module) -> tuple[list[dict], dict]:
    """Unfreeze what `cfg.what` trains; returns optimizer groups and the LoRA adapters.
    `what=unet` is the denoiser, whichever network the family has (SD3: the MMDiT)."""
    adapters: dict = {}
    if cfg.what == "vae":
        vae = model.first_stage_model
        vae.requires_grad_(True)
        if cfg.vq_ema > 0 and getattr(vae.config, "n_embed", 0):
            vae.quantize.embedding.weight.requires_grad_(False)  # follows its EMA (vq_train.py)
        return [{"params": [p for p in vae.parameters() if p.requires_grad], "lr": cfg.lr}], \
            adapters
    if cfg.what == "lora":
        # the adapters' random `down` init from the run's seed: a model read from a file has
        # not seeded the generator, and two runs of one config must start alike (resume)
        torch.manual_seed(cfg.seed)
        adapters = inject_lora(model, family_of(model.config).lora_train_targets(model.config),
                               cfg.lora_rank, cfg.lora_alpha, cfg.lora_text_encoder)
        ps = lora_parameters(adapters)
        for p in ps:
            p.requires_grad_(True)
        return [{"params": ps, "lr": cfg.lr}], adapters
    if cfg.what == "controlnet":  # model.control_model, a copy of the frozen U-Net's encoder
        return [{"params": list(attach_controlnet(model, cfg.seed).parameters()),
                 "lr": cfg.lr}], adapters
    net = denoiser_net(model)
    net.requires_grad_(True)
    groups = [{"params": list(net.parameters()), "lr": cfg.lr}]
    if cfg.what == "full":
        te = model.text_encoders[0]
        te.requires_grad_(True)
        groups.append({"params": list(te.parameters()), "lr": cfg.text_lr or cfg.lr})
    return groups, adapters


class PatchDiscriminator(nn.Module):
    """A small PatchGAN (Isola et al. 2017): a real/fake logit per image patch, no pretrained
    weights needed; the VAE's optional adversarial term."""

    def __init__(self, ch: int = 64):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, ch, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(ch, ch * 2, 4, 2, 1), nn.GroupNorm(8, ch * 2), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 2, ch * 4, 4, 2, 1), nn.GroupNorm(8, ch * 4), nn.LeakyReLU(0.2),
            nn.Conv2d(ch * 4, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Trainee(nn.Module):
    """The trained computation as one module (what DDP wraps): a micro-batch → loss. The
    objective and the conditioning are the family's (objectives.py); only diffusion runs
    have them."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, objective: nn.Module | None = None,
                 conditioning=None):
        super().__init__()
        self.model, self.cfg = model, cfg
        self.objective, self.conditioning = objective, conditioning
        # the family's calling convention around the network (not a submodule: its
        # parameters are the model's)
        self.denoise = None
        if objective is not None:
            self.denoise = family_of(model.config).denoiser_model(model).__call__
        # a VQ first stage trains on its own terms (vq_train.py)
        self.vq = (VQLoss(model.first_stage_model, cfg.rec_loss, cfg.vq_beta, cfg.vq_ema,
                          cfg.vq_restart)
                   if cfg.what == "vae" and model.config.vae.n_embed else None)

    def vae_loss(self, x: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction of a posterior sample + KL to N(0, I) (Kingma & Welling 2014). The KL
        is summed per image and divided by its pixel count: kl_weight means what it does in LDM,
        where the reconstruction error is summed too."""
        vae = self.model.first_stage_model
        if self.vq is not None:
            return self.vq(vae, x)
        mean, logvar = vae.encode(x)
        mean, logvar = mean.float(), logvar.float()
        z = mean + torch.exp(0.5 * logvar) * eps
        rec = vae.decode(z).float()
        err = (rec - x).abs() if self.cfg.rec_loss == "l1" else (rec - x).pow(2)
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1)
        return err.mean() + self.cfg.kl_weight * kl.mean() / x[0].numel(), rec

    def diffusion_loss(self, x0: torch.Tensor, prepared: dict, t: torch.Tensor,
                       noise: torch.Tensor, hint: torch.Tensor | None = None) -> torch.Tensor:
        """The family's objective at drawn timesteps `t` (or σ) and noise, conditioned on the
        prepared captions (and, training a ControlNet, on the hint images)."""
        denoise = self.denoise if hint is None else controlled_denoiser(self.model, hint)
        return self.objective(denoise, x0, t, noise, self.conditioning(prepared))

    def forward(self, *args):
        return self.vae_loss(*args) if self.cfg.what == "vae" else self.diffusion_loss(*args)


@torch.no_grad()
def latent_std(vae, images: list[torch.Tensor], device: torch.device) -> float:
    """Standard deviation of the posterior means of `images` (unscaled)."""
    zs = [vae.encode(x[None].to(device))[0].float().flatten() for x in images]
    return float(torch.cat(zs).std())


def set_vae_scale(model: nn.Module, scale: float, latent_rgb: tuple[float, ...] = ()) -> None:
    """Set the latent scale factor (and the preview's latent → RGB factors) in the model's
    config and its VAE's."""
    import dataclasses
    vae_cfg = dataclasses.replace(model.config.vae, scale_factor=scale, latent_rgb=latent_rgb)
    model.config = model.config.replace(vae=vae_cfg)
    model.first_stage_model.config = vae_cfg


@torch.no_grad()
def fit_latent_rgb(vae, images: list[torch.Tensor], device: torch.device
                   ) -> tuple[float, ...]:
    """Least-squares latent → RGB factors and bias for the live preview (A1111's Approx cheap,
    fitted instead of guessed): each cell of the diffusion latent (posterior mean, scaled as
    the VAE's config says) against the mean colour of the pixels it covers."""
    xs, ys = [], []
    for x in images:
        z = vae.latent_from_image(x[None].to(device)).float()[0]
        rgb = F.adaptive_avg_pool2d(x[None].float().to(device), z.shape[-2:])[0]
        xs.append(z.flatten(1).T)
        ys.append(rgb.flatten(1).T)
    a = torch.cat(xs).double().cpu()
    a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
    sol = torch.linalg.lstsq(a, torch.cat(ys).double().cpu()).solution  # [C + 1, 3]
    return tuple(round(float(v), 5) for v in sol.flatten())


def lr_factor(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to 1, then constant, cosine or linear decay to 0 at cfg.steps."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    p = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * p))
    if cfg.schedule == "linear":
        return 1 - p
    return 1.0


# ------------------------------------------------------------------ logging and samples

class Logger:
    """Scalars to metrics.jsonl, and to TensorBoard when the `tensorboard` package is installed."""

    def __init__(self, out: Path, enabled: bool, start: int):
        """Rows of steps after `start` (run again from there) are dropped atomically, then
        rows are appended: a kill never costs the log more than its unfinished last row."""
        self.file, self.tb = None, None
        if not enabled:
            return
        path = out / "metrics.jsonl"
        trim_log(path, start)
        self.file = open(path, "a", encoding="utf-8")
        try:
            # an optional dependency: torch's writer needs the tensorboard package
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=start + 1)
        except ImportError:
            pass

    def log(self, step: int, **scalars: float) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **scalars}) + "\n")
        self.file.flush()
        if self.tb is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(f"train/{k}", v, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def pipeline_sample_fn(cfg: TrainConfig) -> SampleFn | None:
    """The txt2img pipeline as a sample hook (seed i for prompt i), or None without it."""
    try:
        from ..pipelines.engine import Engine
        from ..pipelines.generate import generate
        from ..pipelines.params import GenerationParams
    except ImportError:
        return None

    size = max(64, cfg.resolution)  # the pipeline's smallest size

    def sample(model: nn.Module, prompts: list[str], step: int) -> list[Image.Image]:
        eng = Engine(model)
        return [generate(eng, GenerationParams(prompt=p, seed=i, steps=cfg.sample_steps,
                                               width=size, height=size)).images[0]
                for i, p in enumerate(prompts)]
    return sample


def save_samples(out: Path, cfg: TrainConfig, model: nn.Module, ema: EMA | None,
                 step: int, sample_fn: SampleFn) -> Path | None:
    """A grid of the fixed prompts' images (EMA weights when EMA is on), saved atomically."""
    from ..images import image_grid
    from ..infotext import save_png
    backup = ema.copy_to(model) if ema is not None else None
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            imgs = sample_fn(model, list(cfg.sample_prompts), step)
        if not imgs:
            return None
        return save_png(image_grid(imgs), out / "samples" / f"step-{step:07d}.png",
                        f"step {step}: " + " | ".join(cfg.sample_prompts))
    except Exception as e:  # a failed sample grid must not end a long run
        print(f"sdloom: sample grid at step {step} failed: {type(e).__name__}: {e}",
              file=sys.stderr)
        return None
    finally:
        model.train(was)
        if backup is not None:
            ema.restore(model, backup)


# ------------------------------------------------------------------ checkpoints

def save_checkpoint(out: Path, cfg: TrainConfig, model: nn.Module, adapters: dict,
                    opt, ema: EMA | None, scaler, disc, disc_opt, gen: torch.Generator,
                    step: int, d: Dist, calib: list[torch.Tensor] | None = None,
                    vq: VQLoss | None = None) -> None:
    """model.safetensors (or lora.safetensors; EMA weights when EMA is on), written atomically,
    then a training state for an exact resume, published whole (see state.py)."""
    rngs = gather_rng(gen, d)
    if not d.main:
        return
    meta = {"sdloom_step": str(step), "sdloom_train": cfg.to_json()}
    backup = ema.copy_to(model) if ema is not None else None
    try:
        if calib:  # VAE runs: the scale that gives the saved VAE unit-variance latents
            std = latent_std(model.first_stage_model, calib, model.device)
            set_vae_scale(model, 1.0 / max(std, 1e-6))
            set_vae_scale(model, model.config.vae.scale_factor,
                          fit_latent_rgb(model.first_stage_model, calib, model.device))
        if adapters:
            version = family_of(model.config).kohya_base_version(model.config)
            save_safetensors(lora_state_dict(adapters, DTYPES[cfg.save_dtype]),
                             out / "lora.safetensors",
                             {**lora_metadata(version, cfg.lora_rank, cfg.lora_alpha), **meta})
        elif cfg.what == "controlnet":
            controlnet_file(model, out / "controlnet.safetensors", DTYPES[cfg.save_dtype],
                            Path(base_model_file(cfg.model)).stem, cfg.control_preprocessor,
                            meta)
        else:
            save_model(model, model.config, out / "model.safetensors",
                       dtype=DTYPES[cfg.save_dtype], extra_metadata=meta)
    finally:
        if backup is not None:
            ema.restore(model, backup)
    raw = {k: p for k, p in model.named_parameters() if p.requires_grad}
    st = trainer_state(step, d, opt, rngs, ema, scaler)
    if disc is not None:
        st["disc"], st["disc_optimizer"] = disc.state_dict(), disc_opt.state_dict()
    if vq is not None and (vq_state := vq.state_dict_of(model.first_stage_model)):
        st["vq"] = vq_state
    publish_state(out, step, raw, st, cfg)


def load_checkpoint(state: Path, cfg: TrainConfig, model: nn.Module, opt, ema, scaler,
                    disc, disc_opt, gen: torch.Generator, d: Dist,
                    vq: VQLoss | None = None) -> int:
    """Restore weights, optimizer, EMA, scaler and RNGs; returns the step to continue from."""
    raw, st = load_state(state, cfg)
    own = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if raw.keys() != own.keys():
        diff = sorted(raw.keys() ^ own.keys())
        raise SdloomError(f"--resume: saved weights do not match this run ({len(diff)} names "
                          f"differ, e.g. {diff[0]})")
    if (ema is not None) != ("ema" in st):
        raise SdloomError(f"--resume: {state} was saved {'with' if 'ema' in st else 'without'} "
                          "EMA; ema_decay cannot be turned on or off in a resumed run")
    with torch.no_grad():
        for k, p in own.items():
            p.copy_(raw[k])
    opt.load_state_dict(st["optimizer"])
    if ema is not None:
        ema.load_state_dict(st["ema"])
    if scaler is not None and "scaler" in st:  # fp16 ↔ bf16: a new scaler is a fresh start
        scaler.load_state_dict(st["scaler"])
    if disc is not None and "disc" in st:  # adv_weight turned on: the discriminator starts
        disc.load_state_dict(st["disc"])
        disc_opt.load_state_dict(st["disc_optimizer"])
    if vq is not None and "vq" in st:
        vq.load_state_dict_of(model.first_stage_model, st["vq"])
    restore_rng(st, gen, d)
    return int(st["step"])


def trainer_state(step: int, d: Dist, opt, rngs: list[dict], ema: EMA | None, scaler) -> dict:
    """What a resume needs besides the weights: step, world size, optimizer, every rank's
    generators, EMA and fp16 scaler (tensors and plain values: weights_only loads it)."""
    st = {"step": step, "world": d.world, "optimizer": opt.state_dict(), "rng": rngs}
    if ema is not None:
        st["ema"] = ema.state_dict()
    if scaler is not None:
        st["scaler"] = scaler.state_dict()
    return st


def gather_rng(gen: torch.Generator, d: Dist) -> list[dict]:
    """Every rank's generators (the data/noise one, torch's, CUDA's), so that a resume
    restores all of them."""
    rng = {"data": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return d.gather(rng)


def restore_rng(st: dict, gen: torch.Generator, d: Dist) -> None:
    """This rank's generators from a training state (gather_rng's list under "rng")."""
    if st["world"] != d.world:
        print(f"sdloom: resuming a {st['world']}-process run on {d.world}: data order and "
              "noise differ from the uninterrupted run", file=sys.stderr)
    rng = st["rng"][d.rank % len(st["rng"])]
    gen.set_state(rng["data"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state(rng["cuda"])


# ------------------------------------------------------------------ the loop

def train(cfg: TrainConfig, data_dir: str | Path, output_dir: str | Path, resume: bool = False,
          *, sample_fn: SampleFn | None = None, progress: bool = True,
          stop_after: int | None = None, device: str = "auto") -> dict:
    """Run (or continue, with `resume`) a training; returns {"losses", "step", "model",
    "images_per_s"}. `stop_after` ends this process after that many steps as an interruption
    would (the schedule still spans cfg.steps). Under torchrun every rank calls this."""
    cfg.validate()
    d, dev = init_distributed(device)
    try:
        if cfg.what == "esrgan":  # a pixel-space network, not a latent diffusion model
            from .sr_train import train_upscaler
            return train_upscaler(cfg, Path(data_dir), Path(output_dir), resume, progress,
                                  stop_after, d, dev)
        if cfg.what == "words":  # the text encoder's new-word rows, by distillation
            from .words_train import train_words
            return train_words(cfg, Path(data_dir), Path(output_dir), resume, progress,
                               stop_after, d, dev)
        return _train(cfg, Path(data_dir), Path(output_dir), resume, sample_fn, progress,
                      stop_after, d, dev)
    finally:
        shutdown(d)


def _train(cfg: TrainConfig, data: Path, out: Path, resume: bool, sample_fn, progress: bool,
           stop_after: int | None, d: Dist, device: torch.device) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    state = claim_output(out, cfg, resume)
    if d.main:  # before anything is written: killed saves may have filled the disk
        clean_leftovers(out)
    if device.type == "cuda":  # TF32 matmuls: fp32 training at tensor-core speed
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    kw = dict(buckets=cfg.buckets, bucket_step=cfg.bucket_step, random_crop=cfg.random_crop,
              flip=cfg.flip, caption_dropout=cfg.caption_dropout,
              include_holdout=cfg.include_holdout, caption_templates=cfg.caption_templates,
              caption_variants=cfg.caption_variants)
    if cfg.what == "x4":  # random x4_crop² windows of the high-res images
        kw["window"] = cfg.x4_crop
    ds = (ControlDataset(data, cfg.resolution, preprocessor=cfg.control_preprocessor, **kw)
          if cfg.what == "controlnet" else ImageCaptionDataset(data, cfg.resolution, **kw))
    sampler = BatchSampler(ds.sizes, cfg.batch_size, cfg.seed, d.rank, d.world)
    model = build_model(cfg, device)
    family = family_of(model.config)
    objective = None
    if cfg.what != "vae":  # chosen once: eps/v on the DDPM table, or rectified flow
        objective = objective_for(family.model_sampling(model.config), cfg.min_snr_gamma)
    _check_sizes(cfg, model)
    groups, adapters = trainable(cfg, model)
    _set_grad_checkpointing(model, cfg.grad_checkpointing)
    for g in groups:
        g["base_lr"] = g["lr"]
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, betas=tuple(cfg.adam_betas),
                            **({"fused": True} if device.type == "cuda" else {}))
    conditioning = None
    if objective is not None:  # the family's own (LDSR: the low-res image), else the captions
        conditioning = (family.training_conditioning(model)
                        or conditioning_for(family, model))
    if cfg.what == "x4":  # + the upscaler's low-res input, made from each batch's images
        conditioning = LowResConditioning(conditioning, model.config, cfg.x4_crop)
    trainee = Trainee(model, cfg, objective, conditioning).to(device)
    # SD2's OpenCLIP never runs its last layer nor its projection: with the text encoder
    # trained, DDP must expect parameters without gradients
    module = wrap_ddp(trainee, d, device, find_unused=cfg.what == "full")
    disc = disc_opt = disc_module = None
    if cfg.what == "vae" and cfg.adv_weight > 0:
        torch.manual_seed(cfg.seed + 1)
        disc = PatchDiscriminator().to(device)
        disc_opt = torch.optim.AdamW(disc.parameters(), lr=cfg.lr, betas=(0.5, 0.9))
        disc_module = wrap_ddp(disc, d, device)
    ema = EMA(model, cfg.ema_decay, cfg.ema_warmup) if cfg.ema_decay > 0 else None
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    scaler = torch.amp.GradScaler(device.type) if amp is torch.float16 else None
    gen = torch.Generator().manual_seed(cfg.seed * 7919 + d.rank)  # timesteps and noise
    torch.manual_seed(cfg.seed + d.rank)
    step = 0
    if state is not None:
        step = load_checkpoint(state, cfg, model, opt, ema, scaler, disc, disc_opt, gen, d,
                               trainee.vq)
    cache = None
    if cfg.what != "vae" and cfg.cache_latents:
        if hasattr(conditioning, "low_res"):
            if d.main:
                print(f"sdloom: not caching latents: what={cfg.what} makes its inputs from the "
                      "images", file=sys.stderr)
        elif cfg.random_crop:
            if d.main:
                print("sdloom: not caching latents: random crops differ every epoch",
                      file=sys.stderr)
        else:
            cache = encode_latents(model, ds, device, amp)
    if sample_fn is None and cfg.sample_every and cfg.what not in ("vae", "controlnet"):
        sample_fn = pipeline_sample_fn(cfg)
        if sample_fn is None and d.main:
            print("sdloom: no sample grids (the txt2img pipeline is not available)",
                  file=sys.stderr)
    calib = None
    # VQ latents keep scale 1 (LDM's VQ first stages): only KL runs calibrate it
    if cfg.what == "vae" and cfg.vae_scale_by_std and d.main and trainee.vq is None:
        calib = [ds.image(i) for i in range(min(64, len(ds)))]
    params = [p for g in opt.param_groups for p in g["params"]]
    batches = (control_batches if cfg.what == "controlnet" else micro_batches)(
        ds, sampler, step * cfg.grad_accum, cache, cfg.num_workers, pin=device.type == "cuda")
    if d.main:  # the run is set up: from here on the folder is this run's
        atomic_write_text(out / "config.json", cfg.to_json())
    logger = Logger(out, d.main, step)
    bar = None
    if progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True,
                   desc=f"train {cfg.what}")
    losses: list[float] = []
    window: list[torch.Tensor] = []  # per-step losses on the device, read at log time only
    extra: dict[str, torch.Tensor] = {}
    gnorm = torch.zeros(())
    t0, seen, start = time.perf_counter(), 0, step
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    module.train()
    while step < end:
        for g in opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(cfg, step)
        adv = disc is not None and step >= cfg.adv_start
        total = torch.zeros((), device=device)
        for k in range(cfg.grad_accum):
            b = next(batches)
            # DDP all-reduces gradients on the last micro-batch only
            sync = k == cfg.grad_accum - 1
            autocast = torch.autocast(device.type, dtype=amp or torch.float32,
                                      enabled=amp is not None)
            with _no_sync(module, sync), _no_sync(disc_module, sync):
                with autocast:
                    if cfg.what == "vae":
                        loss, dl = _vae_step(cfg, module, model, disc, disc_module, b, gen,
                                             device, adv)
                        if dl is not None:
                            extra["disc_loss"] = extra.get("disc_loss", 0) + dl.detach() \
                                / cfg.grad_accum
                    else:
                        loss, dl = _diffusion_step(cfg, module, model, objective,
                                                   conditioning, b, gen, device), None
                # the discriminator's loss has its own graph: one backward serves both
                both = (loss if dl is None else loss + dl) / cfg.grad_accum
                (scaler.scale(both) if scaler else both).backward()
            total += loss.detach().float() / cfg.grad_accum
            seen += len(b["captions"]) * d.world
        gnorm = optimizer_step((opt, disc_opt) if adv else (opt,), params, scaler,
                               cfg.grad_clip)
        if ema is not None:
            ema.update(model)
        step += 1
        window.append(total)
        if step % cfg.log_every == 0 or step == end:
            vals = window_losses(window, d, step)
            losses += vals
            lr = opt.param_groups[0]["lr"]
            scalars = {"loss": sum(vals) / len(vals), "lr": lr, "grad_norm": float(gnorm),
                       "images_per_s": seen / (time.perf_counter() - t0)}
            scalars.update({k: float(d.mean(v.reshape(1))) for k, v in extra.items()})
            extra.clear()
            if trainee.vq is not None:  # codebook usage since the last log
                scalars.update(trainee.vq.usage(d.mean(trainee.vq.hits)))
            logger.log(step, **scalars)
            if bar is not None:
                bar.set_postfix(loss=f"{vals[-1]:.4f}", lr=f"{lr:.2e}",
                                img_s=f"{scalars['images_per_s']:.1f}")
        if bar is not None:
            bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            save_checkpoint(out, cfg, model, adapters, opt, ema, scaler, disc, disc_opt, gen,
                            step, d, calib, trainee.vq)
        if (sample_fn is not None and cfg.sample_every and step % cfg.sample_every == 0
                and d.main):
            save_samples(out, cfg, model, ema, step, sample_fn)
    if bar is not None:
        bar.close()
    logger.close()
    if d.enabled:  # every rank must hold the same weights; a mismatch is a bug worth stopping on
        sums = d.gather(checksum(model))
        if d.main:
            (out / "rank_checksums.json").write_text(json.dumps(sums) + "\n")
        if len(set(sums)) != 1:
            raise SdloomError(f"distributed ranks diverged: {sums}")
    elapsed = time.perf_counter() - t0
    return {"losses": losses, "step": step, "model": model,
            "images_per_s": seen / elapsed if step > start else 0.0}


def one_network_loop(cfg: TrainConfig, out: Path, d: Dist, device: torch.device, *,
                     step: int, stop_after: int | None, progress: bool, desc: str, unit: str,
                     module: nn.Module, trained: nn.Module, opt, ema: EMA | None, scaler,
                     micro: Callable[[], tuple[torch.Tensor, int]],
                     save: Callable[[int], None]) -> dict:
    """The loop of the runs that train one network with one optimizer (what=esrgan,
    what=words) from `step` on: the lr schedule, `grad_accum` micro-batches (`micro()` returns
    one's loss, computed under the run's autocast, and its sample count; DDP all-reduces on the
    last only), clipping, EMA over `trained`, logging, progress, `save(step)` every save_every
    steps and at the end, and the ranks' agreement. Returns train()'s dict without "model"."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision)
    params = [p for p in trained.parameters() if p.requires_grad]
    logger = Logger(out, d.main, step)
    bar = None
    if progress and d.main:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=step, unit="step", dynamic_ncols=True, desc=desc)
    losses: list[float] = []
    window: list[torch.Tensor] = []
    t0, seen, start = time.perf_counter(), 0, step
    end = cfg.steps if stop_after is None else min(cfg.steps, step + stop_after)
    while step < end:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * lr_factor(cfg, step)
        total = torch.zeros((), device=device)
        for k in range(cfg.grad_accum):
            with _no_sync(module, k == cfg.grad_accum - 1):
                with torch.autocast(device.type, dtype=amp or torch.float32,
                                    enabled=amp is not None):
                    loss, n = micro()
                part = loss / cfg.grad_accum
                (scaler.scale(part) if scaler else part).backward()
            total += loss.detach() / cfg.grad_accum
            seen += n * d.world
        gnorm = optimizer_step((opt,), params, scaler, cfg.grad_clip)
        if ema is not None:
            ema.update(trained)
        step += 1
        window.append(total)
        if step % cfg.log_every == 0 or step == end:
            vals = window_losses(window, d, step)
            losses += vals
            lr = opt.param_groups[0]["lr"]
            logger.log(step, loss=sum(vals) / len(vals), lr=lr, grad_norm=float(gnorm),
                       **{f"{unit}_per_s": seen / (time.perf_counter() - t0)})
            if bar is not None:
                bar.set_postfix(loss=f"{vals[-1]:.5f}", lr=f"{lr:.2e}")
        if bar is not None:
            bar.update(1)
        if step % cfg.save_every == 0 or step == end:
            save(step)
    if bar is not None:
        bar.close()
    logger.close()
    if d.enabled:
        sums = d.gather(checksum(trained))
        if len(set(sums)) != 1:
            raise SdloomError(f"distributed ranks diverged: {sums}")
    elapsed = time.perf_counter() - t0
    return {"losses": losses, "step": step, "unit": unit,
            "images_per_s": seen / elapsed if step > start else 0.0}


def optimizer_step(opts, params: list, scaler, clip: float) -> torch.Tensor:
    """One update: unscale the first optimizer's gradients (fp16's scaler), clip the global
    norm of `params` (0 = no clipping), step every optimizer, clear gradients; returns the
    norm before clipping."""
    if scaler:
        scaler.unscale_(opts[0])
    gnorm = torch.nn.utils.clip_grad_norm_(params, clip or float("inf"))
    for o in opts:
        if scaler:
            scaler.step(o)
        else:
            o.step()
    if scaler:
        scaler.update()
    for o in opts:
        o.zero_grad(set_to_none=True)
    return gnorm


def window_losses(window: list[torch.Tensor], d: Dist, step: int) -> list[float]:
    """The steps' losses since the last log, averaged over ranks (the window is emptied);
    SdloomError when one is not finite."""
    vals = d.mean(torch.stack(window)).tolist()
    window.clear()
    if not all(math.isfinite(v) for v in vals):
        raise SdloomError(f"the loss is not finite at step {step}: lower the learning "
                          "rate, or use bf16 rather than fp16")
    return vals


def _check_sizes(cfg: TrainConfig, model: nn.Module) -> None:
    """Image sides must pass the VAE's downsampling and the denoiser's (a U-Net halves the
    latent at every level but the last; an MMDiT cuts it in patches) without remainder."""
    f = model.config.vae.downscale
    if cfg.what != "vae":
        net = denoiser_net(model).config
        f *= (2 ** (len(net.channel_mult) - 1) if hasattr(net, "channel_mult")
              else net.patch_size)
    if cfg.resolution % f or (cfg.buckets and cfg.bucket_step % f):
        raise SdloomError(f"resolution{' and bucket_step' if cfg.buckets else ''} must be "
                          f"multiples of {f} for this model")


def _set_grad_checkpointing(model: nn.Module, on: bool) -> None:
    net = denoiser_net(model)
    if not hasattr(net, "gradient_checkpointing"):
        if on:
            raise SdloomError(f"grad_checkpointing: sdloom's {type(net).__name__} does not "
                              "support it")
        return
    net.gradient_checkpointing = on


def _no_sync(module, sync: bool):
    """DDP's no_sync() for gradient accumulation; a null context otherwise."""
    from contextlib import nullcontext
    return module.no_sync() if module is not None and not sync and hasattr(module, "no_sync") \
        else nullcontext()


def _adversarial(cfg, loss, disc, disc_module, x, rec):
    """Generator hinge term (through frozen copies of the discriminator's weights, so it trains
    only the VAE) and the discriminator's hinge loss on real vs detached reconstructions."""
    frozen = {n: p.detach() for n, p in disc.named_parameters()}
    g = -torch.func.functional_call(disc, frozen, (rec,)).float().mean()
    logits = disc_module(torch.cat([x, rec.detach()])).float()
    real, fake = logits.chunk(2)
    dl = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    return loss + cfg.adv_weight * g, dl


def _vae_step(cfg, module, model, disc, disc_module, b, gen, device, adv: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One micro-batch of VAE training: (VAE loss, discriminator loss or None)."""
    x = b["pixels"].to(device, non_blocking=True)
    f, c = model.config.vae.downscale, model.config.vae.embed_dim
    eps = torch.randn((x.shape[0], c, x.shape[2] // f, x.shape[3] // f), generator=gen)
    loss, rec = module(x, eps.to(device))
    if not adv:
        return loss, None
    return _adversarial(cfg, loss, disc, disc_module, x, rec)


def _diffusion_step(cfg, module, model, objective, conditioning, b, gen, device
                    ) -> torch.Tensor:
    """One micro-batch of the denoising objective: latents, captions (and for what=x4 the
    noised low-res images), t (or σ) and noise → loss."""
    if "latents" in b:
        x0 = b["latents"].to(device, non_blocking=True)
    else:
        pixels = b["pixels"].to(device, non_blocking=True)
        with torch.no_grad():
            x0 = model.first_stage_model.latent_from_image(pixels).float()
    n, f = x0.shape[0], model.config.vae.downscale
    prepared = conditioning.prepare(b["captions"], (x0.shape[3] * f, x0.shape[2] * f), device)
    if hasattr(conditioning, "low_res"):
        prepared.update(conditioning.low_res(pixels, gen))
    # drawn on the CPU generator: the same run on any device, and restorable on resume
    t = objective.draw(n, gen)
    noise = torch.randn(x0.shape, generator=gen)
    if cfg.offset_noise:  # Guttenberg 2023: lets the model shift a whole channel's mean
        noise = noise + cfg.offset_noise * torch.randn((n, x0.shape[1], 1, 1), generator=gen)
    args = (x0, prepared, t.to(device), noise.to(device))
    if "hint" in b:  # uint8 condition images → [0, 1], as generation's hint_tensor gives them
        args += (b["hint"].to(device, non_blocking=True).float() / 255,)
    return module(*args)


# ------------------------------------------------------------------ command line

def add_train_args(p: argparse.ArgumentParser) -> None:
    """`sdloom train` flags: data/output/config/preset/resume, and one flag per TrainConfig
    field (also settable as --set KEY=VALUE)."""
    p.add_argument("--data", required=True, help="images + .txt captions, or a metadata.jsonl")
    p.add_argument("--output", required=True, help="output folder (model, states/, metrics.jsonl, samples/)")
    p.add_argument("--config", help="a JSON file of TrainConfig fields")
    p.add_argument("--preset", choices=sorted(PRESETS), help="a named recipe")
    p.add_argument("--resume", action="store_true", help="continue exactly from the newest state in OUTPUT/states")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any TrainConfig field")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop this process after N steps (continue later with --resume)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("training options (TrainConfig fields)")
    for name, default in TrainConfig.__dataclass_fields__.items():
        flag, kw = "--" + name.replace("_", "-"), {"dest": name, "default": None,
                                                  "help": HELP.get(name, "")}
        value = default.default
        if isinstance(value, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif name == "adam_betas":
            g.add_argument(flag, nargs=2, type=float, metavar=("B1", "B2"), **kw)
        elif isinstance(value, tuple):
            g.add_argument(flag, nargs="+", metavar="TEXT", **kw)
        elif name in CHOICES:
            g.add_argument(flag, choices=CHOICES[name], **kw)
        else:
            typ = type(value) if value is not None else (float if name == "text_lr" else str)
            g.add_argument(flag, type=typ, metavar=name.upper() if typ is str else
                           typ.__name__.upper(), **kw)
    p.set_defaults(func=run_train)


def config_from_args(a) -> TrainConfig:
    """defaults < the run's saved config (on --resume) < --preset < --config < flags, --set."""
    cfg = TrainConfig()
    saved = Path(a.output) / "config.json"
    if a.resume and saved.exists():
        cfg = TrainConfig.load(saved)
    if a.preset:
        cfg = cfg.override(PRESETS[a.preset])
    if a.config:
        cfg = TrainConfig.load(a.config, base=cfg)
    over = {f: getattr(a, f) for f in TrainConfig.__dataclass_fields__
            if getattr(a, f, None) is not None}
    for kv in a.set:
        if "=" not in kv:
            raise SdloomError(f"--set expects KEY=VALUE, got {kv!r}")
        k, v = kv.split("=", 1)
        over[k.strip()] = v
    return cfg.override(over)


def run_train(a) -> int:
    """The `sdloom train` command."""
    cfg = config_from_args(a)
    res = train(cfg, a.data, a.output, resume=a.resume, progress=not a.no_progress,
                stop_after=a.stop_after, device=a.device)
    if res["losses"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"trained to step {res['step']}; last loss {res['losses'][-1]:.4f}; "
              f"{res['images_per_s']:.1f} {res.get('unit', 'images')}/s → {a.output}",
              file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m sdloom.training.train …` (what torchrun runs)."""
    ap = argparse.ArgumentParser(prog="python -m sdloom.training.train",
                                 description="Train or fine-tune a Stable Diffusion model.")
    add_train_args(ap)
    a = ap.parse_args(argv)
    try:
        return run_train(a)
    except SdloomError as e:
        print(f"sdloom: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
