"""Typed training configuration: Python presets + CLI overrides, saved as JSON beside outputs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import SdloomError

WHAT = ("vae", "unet", "full", "lora", "controlnet", "x4", "esrgan", "words")
CHOICES: dict[str, tuple[str, ...]] = {
    "what": WHAT, "precision": ("fp32", "bf16", "fp16"),
    "schedule": ("constant", "cosine", "linear"), "prediction": ("eps", "v"),
    "rec_loss": ("l1", "l2"), "save_dtype": ("fp32", "fp16", "bf16"),
    "control_preprocessor": ("canny", "invert", "threshold")}


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs besides its data and output folders."""
    what: str = "unet"
    model: str = "embedded"
    vae_from: str | None = None
    resolution: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    text_lr: float | None = None
    weight_decay: float = 1e-2
    adam_betas: tuple[float, ...] = (0.9, 0.999)
    warmup: int = 100
    schedule: str = "cosine"
    steps: int = 1000
    precision: str = "fp32"
    grad_checkpointing: bool = False
    grad_clip: float = 1.0
    ema_decay: float = 0.0
    ema_warmup: bool = True
    prediction: str | None = None
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0
    caption_dropout: float = 0.1
    caption_templates: tuple[str, ...] = ()
    caption_variants: bool = False
    flip: bool = False
    random_crop: bool = False
    buckets: bool = False
    bucket_step: int = 64
    cache_latents: bool = True
    rec_loss: str = "l1"
    kl_weight: float = 1e-6
    adv_weight: float = 0.0
    adv_start: int = 0
    vae_scale_by_std: bool = True
    vq_beta: float = 0.25
    vq_ema: float = 0.0
    vq_restart: float = 0.0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_text_encoder: bool = False
    control_preprocessor: str | None = None
    x4_crop: int = 0
    blur_max: float = 0.0
    save_every: int = 500
    save_dtype: str = "fp32"
    sample_every: int = 0
    log_every: int = 10
    sample_prompts: tuple[str, ...] = ("a red apple", "grinning face", "thumbs up", "cat face")
    sample_steps: int = 20
    seed: int = 0
    include_holdout: bool = False
    num_workers: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def load(cls, path: str | Path, base: TrainConfig | None = None) -> TrainConfig:
        """A JSON file of (some) fields over `base` (default: the defaults)."""
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SdloomError(f"cannot read training config {path}: {e}") from None
        if not isinstance(d, dict):
            raise SdloomError(f"{path}: a training config is a JSON object")
        return (base or cls()).override(d)

    def override(self, d: dict) -> TrainConfig:
        """A copy with fields replaced; strings (from the command line) are parsed by type."""
        names = {f.name for f in dataclasses.fields(self)}
        kw = {}
        for k, v in d.items():
            k = k.replace("-", "_")
            if k not in names:
                raise SdloomError(f"unknown training option {k!r} "
                                  f"(known: {', '.join(sorted(names))})")
            kw[k] = _coerce(k, v, getattr(TrainConfig, k))
        return dataclasses.replace(self, **kw)

    def validate(self) -> None:
        """Raise SdloomError naming the first inconsistent option."""
        for k, allowed in CHOICES.items():
            if getattr(self, k) not in allowed and not (k in NULLABLE and getattr(self, k) is None):
                raise SdloomError(f"{k} must be one of {', '.join(allowed)}, "
                                  f"not {getattr(self, k)!r}")
        if self.resolution % 8 or self.resolution < 8:
            raise SdloomError(f"resolution must be a positive multiple of 8, not {self.resolution}")
        for k in ("batch_size", "grad_accum", "steps", "save_every", "log_every", "lora_rank",
                  "bucket_step"):
            if getattr(self, k) < 1:
                raise SdloomError(f"{k} must be at least 1")
        if not 0.0 <= self.vq_ema < 1.0 or self.vq_beta < 0 or not 0 <= self.vq_restart < 1:
            raise SdloomError("vq_ema and vq_restart must be in [0, 1), vq_beta ≥ 0")
        if not 0.0 <= self.caption_dropout <= 1.0 or not 0.0 <= self.ema_decay < 1.0:
            raise SdloomError("caption_dropout must be in [0, 1] and ema_decay in [0, 1)")
        if self.blur_max < 0:
            raise SdloomError("blur_max must be ≥ 0")
        if self.x4_crop < 0 or self.x4_crop > self.resolution:
            raise SdloomError(f"x4_crop must be in 0…resolution ({self.resolution})")
        if self.warmup < 0 or self.sample_every < 0 or self.num_workers < 0:
            raise SdloomError("warmup, sample_every and num_workers must be ≥ 0")
        if any("{}" not in t for t in self.caption_templates):
            raise SdloomError("every caption template must hold {} (where the caption goes)")
        if len(self.adam_betas) != 2:
            raise SdloomError("adam_betas takes two numbers, e.g. 0.9,0.999")


def _coerce(name: str, v, default):
    """Parse a command-line string (or a JSON value) into the field's type."""
    if isinstance(v, str):
        s = v.strip()
        if isinstance(default, bool):
            if s.lower() in ("1", "true", "yes", "on"):
                return True
            if s.lower() in ("0", "false", "no", "off"):
                return False
            raise SdloomError(f"{name}: expected true or false, got {v!r}")
        if s.lower() == "none" and name in NULLABLE:
            return None
        try:
            if isinstance(default, int):
                return int(s)
            if isinstance(default, float) or name in ("text_lr",):
                return float(s)
        except ValueError:
            raise SdloomError(f"{name}: expected a number, got {v!r}") from None
        if isinstance(default, tuple):
            sep = "|" if name in ("sample_prompts", "caption_templates") else ","
            parts = [p.strip() for p in s.split(sep) if p.strip()]
            return tuple(float(p) for p in parts) if name == "adam_betas" else tuple(parts)
        return v
    if isinstance(v, list):
        return tuple(v)
    if isinstance(default, float) and isinstance(v, int) and not isinstance(v, bool):
        return float(v)
    return v


NULLABLE = ("vae_from", "text_lr", "prediction", "control_preprocessor")

# One line per field: the command line's help and the documentation of a config file.
HELP: dict[str, str] = {
    "what": "vae | unet (the denoiser: the U-Net, or SD3's MMDiT with its text encoders "
            "frozen) | full (U-Net + text encoder jointly, e.g. from scratch) | lora | "
            "controlnet (a ControlNet for the frozen model, training/controlnet_train.py) | "
            "x4 (an SD x4 upscaler's U-Net on its images made 4× smaller, noise-augmented) | "
            "esrgan (an ESRGAN-family network on pixels, training/sr_train.py) | words (a "
            "trained model's text encoder learns the words of metadata.jsonl's variants that "
            "no caption holds; captions encode as before; training/words_train.py)",
    "model": "a model preset name (fresh random weights) or a checkpoint to start from; "
             "what=controlnet: the frozen base model (`embedded`: the shipped model file)",
    "vae_from": "take the (frozen) VAE from this checkpoint, e.g. a `what=vae` run's output",
    "resolution": "training size in pixels (images are resized on the shorter side and cropped)",
    "batch_size": "images per step per process (the global batch is this × processes × accum)",
    "grad_accum": "micro-batches accumulated per optimizer step",
    "lr": "peak learning rate (AdamW)",
    "text_lr": "text encoder learning rate for what=full (default: lr)",
    "weight_decay": "AdamW weight decay",
    "adam_betas": "AdamW betas (β1 β2)",
    "warmup": "linear LR warm-up steps",
    "schedule": "LR schedule after warm-up: constant | cosine | linear (to 0 at `steps`)",
    "steps": "optimizer steps in all",
    "precision": "fp32 | bf16 | fp16 (autocast; fp16 adds a gradient scaler)",
    "grad_checkpointing": "recompute U-Net blocks in the backward pass to save memory",
    "grad_clip": "clip the global gradient norm to this (0 = no clipping)",
    "ema_decay": "EMA of the trained weights (0 = off); model.safetensors holds the EMA",
    "ema_warmup": "ramp the EMA decay as (1+n)/(10+n) early on",
    "prediction": "eps | v target for the U-Net (default: the model's own; not for SD3, "
                  "which trains on rectified flow)",
    "offset_noise": "offset-noise strength (per-channel constant added to the noise)",
    "min_snr_gamma": "min-SNR-γ loss weighting of eps/v (Hang et al. 2023); 0 = off, 5 is "
                     "usual (not for SD3: logit-normal timesteps, uniform weighting)",
    "caption_dropout": "probability of an empty caption (for classifier-free guidance)",
    "caption_templates": "templates the caption is put into, one drawn per sample, `{}` = the "
                         "caption (e.g. '{}|a {}|the {}'); none = captions as written",
    "caption_variants": "draw half the captions from metadata.jsonl's `variants` column (other "
                        "names of the image, e.g. the emoji builder's short names, aliases and "
                        "CLDR keywords), uniformly",
    "flip": "random horizontal flips",
    "random_crop": "random instead of centred crops",
    "buckets": "aspect-ratio buckets of about resolution² pixels",
    "bucket_step": "bucket sides are multiples of this",
    "cache_latents": "encode every image once with the frozen VAE before training",
    "rec_loss": "reconstruction loss of what=vae and what=esrgan: l1 | l2",
    "kl_weight": "VAE KL weight, relative to the summed reconstruction error as in LDM",
    "adv_weight": "VAE patch-discriminator (hinge) weight; 0 = off",
    "adv_start": "step at which the VAE discriminator starts",
    "vq_beta": "VQ autoencoders: commitment weight β (‖z − sg[e]‖², van den Oord et al. 2017)",
    "vq_ema": "VQ autoencoders: codebook as an EMA of assigned encoder outputs with this "
              "decay (e.g. 0.99; 0 = trained by the codebook loss)",
    "vq_restart": "VQ autoencoders: move codes used less than this fraction of a uniform "
                  "share (running average) to random encoder outputs (e.g. 0.03; 0 = off)",
    "vae_scale_by_std": "store 1/std of the training latents as the VAE's scale factor "
                        "(LDM's scale_by_std), so diffusion sees unit-variance latents",
    "lora_rank": "LoRA rank",
    "lora_alpha": "LoRA alpha (scale = alpha / rank)",
    "lora_text_encoder": "also train LoRA on the text encoder (hf/CLIP-L layout only)",
    "control_preprocessor": "what=controlnet: make each condition image from its training "
                            "image with this preprocessor (canny at the extension's 100/200 "
                            "thresholds, invert, threshold); unset: metadata.jsonl's "
                            "conditioning_file_name column",
    "x4_crop": "what=x4 and esrgan: train on a random square crop of this many pixels of each image "
               "(0 = the whole image); the low-res input is made from the crop",
    "blur_max": "what=esrgan: blur each window by a Gaussian of σ uniform in [0, blur_max] "
                "high-res pixels before making its input (0 = clean bicubic inputs)",
    "save_every": "write model + training state every N steps (and at the end)",
    "save_dtype": "dtype of model.safetensors: fp32 | fp16 | bf16",
    "sample_every": "sample the fixed prompts every N steps into samples/ (0 = never)",
    "log_every": "log scalars every N steps",
    "sample_prompts": "prompts for sample grids, separated by |",
    "sample_steps": "sampler steps for sample grids",
    "seed": "seed of initialisation, data order, augmentation and noise",
    "include_holdout": "also train on metadata.jsonl rows marked holdout",
    "num_workers": "DataLoader worker processes for image loading",
}

# captions in everyday phrasing (the embedded model's stage 3)
PHRASING = ("{}", "{}", "a {}", "an {}", "the {}", "{} emoji", "an emoji of {}")

PRESETS: dict[str, dict] = {
    # the embedded emoji model on one GPU (docs/embedded-model.md), stage 1: the VAE
    "emoji-vae": dict(what="vae", model="embedded", resolution=128, batch_size=64, lr=5e-4,
                      warmup=100, steps=3492, kl_weight=0.05, flip=False, precision="bf16",
                      num_workers=6, save_every=1000),
    # stage 2: U-Net and text encoder jointly, VAE frozen from stage 1 (set vae_from)
    "emoji-full": dict(what="full", model="embedded", resolution=128, batch_size=512, lr=1e-3,
                       warmup=200, steps=2345, ema_decay=0.999, prediction="v",
                       min_snr_gamma=5.0, caption_dropout=0.1, cache_latents=True,
                       precision="bf16", save_every=1000, save_dtype="fp16"),
    # stage 3: a short fine-tune of stage 2's model with captions in everyday phrasing, so
    # that "a red apple" means "red apple" (set model to stage 2's model.safetensors)
    "emoji-phrasing": dict(what="full", resolution=128, batch_size=512, lr=2e-4, warmup=50,
                           steps=1000, ema_decay=0.999, prediction="v", min_snr_gamma=5.0,
                           caption_dropout=0.1, cache_latents=True, precision="bf16",
                           save_every=1000, save_dtype="fp16",
                           caption_templates=PHRASING),
    # a stage-4 try (docs/embedded-model.md, not shipped): stage 3's model (the shipped file)
    # fine-tuned on caption variants (emoji_data's `variants` column: short names and aliases
    # alone), so that they name their emoji; 9 min on the 2-core CPU
    "emoji-variants": dict(what="full", resolution=128, batch_size=64, lr=5e-5, warmup=50,
                           steps=1000, ema_decay=0.999, prediction="v", min_snr_gamma=5.0,
                           caption_dropout=0.1, cache_latents=True, precision="bf16",
                           save_every=250, save_dtype="fp16", caption_templates=PHRASING,
                           caption_variants=True),
    # stage 4 of the shipped model (docs/embedded-model.md): the words of the variants (CLDR
    # keywords above all) that no caption holds, taught to the text encoder's token table by
    # distillation (training/words_train.py) on `emoji_data --keywords en.xml`; every caption
    # encodes as before; 4 min on the 2-core CPU
    "emoji-words": dict(what="words", model="embedded", batch_size=64, lr=5e-3, warmup=0,
                        schedule="cosine", steps=2000, weight_decay=0.0, ema_decay=0.0,
                        precision="fp32", save_every=500, save_dtype="fp16",
                        caption_templates=PHRASING),
    # fine-tuning an SD1.x/SD2.x checkpoint (set model=PATH) on one large GPU
    "sd-finetune": dict(what="unet", resolution=512, batch_size=4, lr=1e-5, warmup=500,
                        schedule="constant", steps=10000, precision="bf16",
                        grad_checkpointing=True, ema_decay=0.9999, caption_dropout=0.1,
                        save_every=1000, sample_every=1000, save_dtype="fp16"),
    # the embedded upscaler (docs/embedded-model.md) on data/emoji512svg, stage 1: its f=4
    # VAE, on the 512² images resized to 256² (a 512² VAE step costs 4× as much); a light KL
    # (LDM's kl-f4 uses 1e-6): its round trip bounds the upscaler's fidelity
    "emoji-x4-vae": dict(what="vae", model="emoji-x4", resolution=256, batch_size=32, lr=5e-4,
                         warmup=100, steps=600, kl_weight=1e-3, flip=True, precision="bf16",
                         num_workers=6, save_every=1000),
    # stage 2: its U-Net on random 256² crops of the 512² images, VAE and text encoder frozen
    # (set model to stage 1's model.safetensors)
    "emoji-x4": dict(what="x4", resolution=512, x4_crop=256, batch_size=64, lr=5e-4,
                     warmup=100, steps=1500, ema_decay=0.995, prediction="v",
                     min_snr_gamma=5.0, caption_dropout=1.0, cache_latents=False, flip=True,
                     precision="bf16", num_workers=6, save_every=1000, save_dtype="fp16"),
    # the shipped embedded upscaler sdloom-emoji-esrgan-x4 (docs/embedded-model.md): the
    # compact ESRGAN net on random 128² windows of the 512² renders (32² inputs, made from
    # the window blurred by σ ∈ [0, 2] px, for soft generated images), L2; 14 min on the CPU
    "emoji-esrgan-x4": dict(what="esrgan", model="emoji-esrgan-x4", resolution=512,
                            x4_crop=128, batch_size=16, lr=5e-4, warmup=100, steps=6000,
                            blur_max=2.0, rec_loss="l2", flip=True, ema_decay=0.999, precision="bf16",
                            grad_clip=1.0, save_every=2000, save_dtype="fp16"),
    "lora": dict(what="lora", lr=1e-4, warmup=0, schedule="constant", steps=1000, lora_rank=8,
                 lora_alpha=8.0, caption_dropout=0.05),
    # the shipped canny ControlNet for the embedded model (docs/embedded-model.md): 97 s on
    # one H200 in bf16 (2720 images/s); half the captions dropped, as the ControlNet paper does
    "emoji-canny": dict(what="controlnet", model="embedded", control_preprocessor="canny",
                        resolution=128, batch_size=256, lr=3e-4, warmup=50, schedule="constant",
                        steps=900, caption_dropout=0.5, cache_latents=True, precision="bf16",
                        num_workers=8, save_every=1000, save_dtype="fp16"),
}
