"""The model families sdloom knows, and the loop that finds a checkpoint's family.

Each family is one object implementing `base.Family`; adding a family means adding it here.
"""
from __future__ import annotations

import json

from ..errors import ModelFileError
from .base import DetectionError, Family, Shapes
from .ldsr import LDSRFamily
from .sd import SDFamily
from .sd3 import SD3Family
from .x4_upscaler import X4UpscalerFamily

# the x4 upscaler and LDSR before SD: all have model.diffusion_model.input_blocks.*
FAMILIES: tuple[Family, ...] = (X4UpscalerFamily(), LDSRFamily(), SDFamily(), SD3Family())


def family_of(cfg) -> Family:
    """The family that built (or builds) a config."""
    for f in FAMILIES:
        if cfg.family in f.names:
            return f
    raise ModelFileError(f"unknown model family {cfg.family!r}")


def detect(shapes: Shapes):
    """The config of a single-file checkpoint, from key names and shapes only."""
    for f in FAMILIES:
        if f.claims(shapes):
            return f.detect(shapes)
    hint = ""
    if any(k.startswith(("encoder.", "decoder.")) for k in shapes):
        hint = " (it looks like a VAE alone: pass it as --vae)"
    elif any(k.startswith("lora_") for k in shapes):
        hint = " (it looks like a LoRA: pass it as --lora)"
    raise DetectionError("not a model sdloom knows: no denoiser tensors of any family "
                         f"(model.diffusion_model.*){hint}")


def config_from_json(text: str):
    """A config stored in a file's metadata: its `family` field says whose it is."""
    d = json.loads(text)
    if not isinstance(d, dict):
        raise ValueError("the config is not a JSON object")
    fam = next((f for f in FAMILIES if d.get("family") in f.names), None)
    if fam is None:
        raise ModelFileError(f"unknown model family {str(d.get('family'))[:40]!r}")
    return fam.config_from_dict(d)


def family_for_pipeline(class_name: str) -> Family | None:
    """The family of a diffusers folder, from model_index.json's _class_name."""
    return next((f for f in FAMILIES if class_name in f.pipeline_classes), None)
