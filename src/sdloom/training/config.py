"""Typed training configuration: Python presets + CLI overrides, saved as JSON beside outputs."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SdloomError


@dataclass
class TrainConfig:
    what: str = "unet"  # vae | unet | full (U-Net + text encoder from scratch) | lora
    model: str = "embedded"  # a preset name, or a checkpoint to start from
    vae_from: str | None = None  # take the (frozen) VAE from this checkpoint
    resolution: int = 128
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-4
    text_lr: float | None = None  # text encoder learning rate (default: lr)
    weight_decay: float = 1e-2
    warmup: int = 100
    schedule: str = "cosine"  # constant | cosine | linear
    steps: int = 1000
    precision: str = "fp32"  # fp32 | bf16 | fp16
    grad_checkpointing: bool = False
    grad_clip: float = 1.0
    ema_decay: float = 0.0  # 0 = no EMA
    prediction: str = "eps"  # eps | v
    offset_noise: float = 0.0
    min_snr_gamma: float = 0.0  # 0 = off (Hang et al. 2023)
    caption_dropout: float = 0.1
    flip: bool = False
    random_crop: bool = False
    buckets: bool = False
    cache_latents: bool = True
    kl_weight: float = 1e-6  # VAE
    adv_weight: float = 0.0  # VAE patch discriminator (no pretrained weights needed)
    adv_start: int = 0
    lora_rank: int = 8
    lora_alpha: float = 8.0
    save_every: int = 500
    sample_every: int = 0
    log_every: int = 10
    sample_prompts: list[str] = field(default_factory=lambda: ["a red apple", "grinning face",
                                                                "thumbs up", "a cat face"])
    sample_steps: int = 20
    seed: int = 0
    include_holdout: bool = False
    num_workers: int = 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        try:
            d = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise SdloomError(f"cannot read training config {path}: {e}") from None
        return cls().override(d)

    def override(self, d: dict) -> TrainConfig:
        names = {f.name: f for f in dataclasses.fields(self)}
        kw = {}
        for k, v in d.items():
            k = k.replace("-", "_")
            if k not in names:
                raise SdloomError(f"unknown training option {k!r}")
            kw[k] = _coerce(v, getattr(self, k), names[k].type)
        return dataclasses.replace(self, **kw)

    def validate(self) -> None:
        if self.what not in ("vae", "unet", "full", "lora"):
            raise SdloomError(f"what must be vae, unet, full or lora, not {self.what!r}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise SdloomError("precision must be fp32, bf16 or fp16")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise SdloomError("schedule must be constant, cosine or linear")
        if self.prediction not in ("eps", "v"):
            raise SdloomError("prediction must be eps or v")
        if self.resolution % 8 or self.batch_size < 1 or self.steps < 1:
            raise SdloomError("resolution must be a multiple of 8; batch size and steps ≥ 1")


def _coerce(v, current, typ):
    if isinstance(v, str) and not isinstance(current, str):
        if isinstance(current, bool):
            return v.lower() in ("1", "true", "yes", "on")
        if isinstance(current, int):
            return int(v)
        if isinstance(current, float) or "float" in str(typ):
            return float(v) if v.lower() != "none" else None
        if isinstance(current, list):
            return [s.strip() for s in v.split("|")]
        if v.lower() == "none":
            return None
    return v


PRESETS: dict[str, dict] = {
    # the embedded emoji model, stage 1: the VAE
    "emoji-vae": dict(what="vae", model="embedded", resolution=128, batch_size=8, lr=4e-4,
                      warmup=50, steps=3000, kl_weight=1e-6, flip=False, save_every=500),
    # stage 2: U-Net and text encoder jointly, VAE frozen from stage 1
    "emoji-full": dict(what="full", model="embedded", resolution=128, batch_size=32, lr=6e-4,
                       warmup=200, steps=20000, ema_decay=0.999, caption_dropout=0.1,
                       cache_latents=True, save_every=1000, sample_every=2000),
    "lora": dict(what="lora", lr=1e-4, steps=1000, lora_rank=8, lora_alpha=8.0),
}
