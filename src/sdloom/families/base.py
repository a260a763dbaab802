"""The family protocol: what one model family (SD1/SD2/SDXL, SD3, …) tells the rest of sdloom.

A family says how to detect itself from tensor shapes, build its model, read and write its
diffusers folders, condition it (tokenizers, text encoders, prompt encoder), noise and denoise it
(eps / v / flow: `sampling.model_sampling`), and what its latents are (`LatentFormat`).
`checkpoints/` loops over the families; pipelines and the server ask the engine's family.
Families import models/, conditioning and sampling, never checkpoints/ or pipelines/: the
shape-reading helpers below are theirs.
"""
from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelFileError, SdloomError

Shapes = Mapping[str, Sequence[int]]
StateDict = dict[str, torch.Tensor]


class DetectionError(ModelFileError):
    """The checkpoint is a family's, but incomplete or malformed: names the missing key."""


def need(shapes: Shapes, key: str, what: str, ndim: int | None = None) -> tuple[int, ...]:
    """The shape of `key`, which must exist, have `ndim` dimensions and no empty one."""
    if key not in shapes:
        raise DetectionError(f"not a complete {what}: missing tensor {key!r}")
    shape = tuple(shapes[key])
    if (ndim is not None and len(shape) != ndim) or not all(
            isinstance(d, int) and d > 0 for d in shape):
        raise DetectionError(f"not a {what}: tensor {key!r} has shape {list(shape)}"
                             + (f", expected {ndim} non-empty dimensions" if ndim else ""))
    return shape


def indices(shapes: Shapes, prefix: str) -> list[int]:
    """The block numbers N of keys `prefix` N `.` …, sorted."""
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def short_repr(x: object) -> str:
    """repr, cut short: values may come from untrusted metadata."""
    r = repr(x)
    return r if len(r) <= 60 else r[:57] + "..."


@dataclass(frozen=True)
class LatentFormat:
    """What a family's latents are: channels, pixels per latent cell, and the VAE's
    normalisation z = (x − shift)·scale."""
    channels: int
    factor: int
    scale: float
    shift: float = 0.0


class ComponentReader:
    """What checkpoints/ gives a family to read a diffusers folder: reader(name) → that
    component's weights; reader.has(name) → whether the folder has it. Errors are
    ModelFileError naming the file."""

    def __call__(self, name: str) -> StateDict:
        raise NotImplementedError

    def has(self, name: str) -> bool:
        raise NotImplementedError


JsonReader = Callable[[str], dict]  # "unet/config.json" → the JSON object


@dataclass(frozen=True)
class ComponentMerge:
    """What a family makes of separate component files: the single file's key prefixes they
    replace, and per file (in the order given) its key → model key; keys left out are dropped."""
    replaces: tuple[str, ...]
    renames: tuple[dict[str, str], ...]


class Family:
    """One model family. Subclasses implement every method; `name` is the config's family."""
    names: tuple[str, ...] = ()  # the `family` values of its configs
    pipeline_classes: tuple[str, ...] = ()  # diffusers model_index _class_name values it reads

    # ---------------------------------------------------------------- files
    def claims(self, shapes: Shapes) -> bool:
        """Whether these tensors are this family's (a cheap key test; detect then reads all)."""
        raise NotImplementedError

    def detect(self, shapes: Shapes):
        """The config of a single file in the original layout, from names and shapes only."""
        raise NotImplementedError

    def config_from_dict(self, d: dict):
        raise NotImplementedError

    def config_problems(self, cfg, shapes: Shapes) -> list[str]:
        """Why a config (e.g. from metadata) does not describe these tensors; [] if it does."""
        raise NotImplementedError

    def build(self, cfg) -> nn.Module:
        """The whole model, its state_dict keys the single-file keys."""
        raise NotImplementedError

    def optional_keys(self, model: nn.Module) -> set[str]:
        """Keys a checkpoint may lack (filled with zeros)."""
        return set()

    def without(self, cfg, parts: Sequence[str]) -> tuple[object, tuple[str, ...]]:
        """The config without optional components `parts`, and the key prefixes to skip."""
        raise SdloomError(f"{cfg.family} models have no optional component "
                          f"{', '.join(map(str, parts))}")

    def key_aliases(self, shapes: Shapes) -> dict[str, str | None]:
        """File key → model key for alternative spellings a file may use (None: drop it)."""
        return {}

    def merge_component_files(self, shapes: Shapes, files: Sequence[tuple[str, Shapes]]
                              ) -> ComponentMerge:
        """How components given as separate files (SD3's text encoders, as A1111 and ComfyUI
        keep them) join a single file with `shapes`: `files` are (display name, shapes)."""
        raise SdloomError("separate text-encoder files apply to SD3 models; this file holds "
                          "its text encoders itself")

    def config_with_components(self, cfg, shapes: Shapes):
        """A stored config (file metadata) with the components that came as separate files
        read again from the merged `shapes`."""
        return cfg

    def open_diffusers(self, name: str, component: ComponentReader, json_of: JsonReader
                       ) -> tuple[object, StateDict]:
        """(config, single-file state dict) of a diffusers folder of this family."""
        raise NotImplementedError

    def save_diffusers(self, cfg, get: Callable[[str], torch.Tensor], keys: Sequence[str],
                       folder: Path, save_tensors: Callable[[StateDict, Path], None]) -> None:
        """Write a diffusers folder into `folder` (the caller makes it atomic)."""
        raise NotImplementedError

    def describe(self, cfg) -> list[tuple[str, str]]:
        """(label, value) lines for `sdloom info`."""
        raise NotImplementedError

    # ---------------------------------------------------------------- running
    def latent_format(self, cfg) -> LatentFormat:
        raise NotImplementedError

    def model_sampling(self, cfg):
        """Noising, denoising and the sigma table (sampling.model_sampling)."""
        raise NotImplementedError

    def denoiser_model(self, model: nn.Module) -> Callable[..., torch.Tensor]:
        """model(x_in, t, **cond) → the network's raw prediction."""
        raise NotImplementedError

    def control_base(self, cfg):
        """The denoiser config ControlNets must fit (SD's U-Net); refuses families without."""
        raise SdloomError(f"ControlNet applies to SD1.x/SD2.x/SDXL models, not to "
                          f"{cfg.family} models")

    def controlled_model(self, model: nn.Module, control) -> nn.Module:
        """denoiser_model with ControlNet residuals added (families that have control_base)."""
        raise SdloomError(f"ControlNet applies to SD1.x/SD2.x/SDXL models, not to "
                          f"{model.config.family} models")

    def generation_refusal(self, cfg) -> str | None:
        """Why txt2img/img2img cannot run this model (e.g. an upscaler), or None."""
        return None

    def prompt_encoder(self, model: nn.Module, embeddings):
        """A prompts.PromptEncoder (or subclass) over the model's text encoders."""
        raise NotImplementedError

    def cond_kwargs(self, cfg, cond, width: int, height: int, aesthetic_score: float,
                    device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The denoiser's keyword arguments for a prompts.Conditioning."""
        raise NotImplementedError

    def size_multiple(self, cfg) -> int:
        """Image sides are rounded down to a multiple of this many pixels."""
        return self.latent_format(cfg).factor

    def training_refusal(self, cfg, what: str) -> str | None:
        """Why `sdloom train` cannot train `what` (vae | unet | full | lora) of this model, or
        None when it can."""
        return f"training {cfg.family} models is not supported yet"

    def training_conditioning(self, model: nn.Module):
        """What `sdloom train` conditions this family's denoiser on when it is not text (an
        object like LDSR's `LowResConcat`: prepare, low_res, __call__), or None: the
        captions through objectives.conditioning_for."""
        return None

    def lora_train_targets(self, cfg) -> tuple[str, ...]:
        """Module-path suffixes in the denoiser that `sdloom train` puts LoRA adapters on."""
        raise SdloomError(f"LoRA training for {cfg.family} models is not supported")

    def kohya_base_version(self, cfg) -> str:
        """kohya's `ss_base_model_version` for LoRA files trained on this model."""
        return cfg.family

    def trains_text_encoder(self, model: nn.Module) -> bool:
        """Whether training reads captions as CLIP ids through a text encoder it can train
        (what=full); otherwise captions go through the frozen prompt encoder."""
        return False

    def lora_targets(self, model: nn.Module) -> dict:
        """LoRA module name → models.lora.Target, for the LoRA files this family reads."""
        raise SdloomError(f"LoRA files for {model.config.family} models are not supported yet")

    def inpaint_channels(self, cfg) -> bool:
        """Whether the denoiser takes inpainting's mask + masked-image latent channels."""
        return False

    def preview_factors(self, cfg) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """A1111's "Approx cheap" live preview (sd_vae_approx.cheap_approximation): a [C, 3]
        matrix and an optional [3] bias taking the model's normalised latents to RGB in
        [-1, 1]; None when they are unknown for this model (no preview)."""
        return None
