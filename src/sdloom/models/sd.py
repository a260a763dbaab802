"""The whole latent diffusion model, laid out so that `state_dict()` keys are the single-file keys.

SD1/SD2: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`.
SDXL:    `model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.{i}.*`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError
from .text_encoders import build_text_encoder
from .unet import UNetModel
from .vae import AutoencoderKL


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class Conditioner(nn.Module):
    """SGM's `GeneralConditioner`: the text embedders of SDXL, in checkpoint order."""

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class LatentDiffusion(nn.Module):
    """U-Net + VAE + text encoder(s) of one Stable Diffusion family member."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        encoders = [build_text_encoder(c) for c in config.text_encoders]
        if config.is_sdxl:
            self.conditioner = Conditioner(encoders)
        else:
            if len(encoders) != 1:
                raise ModelFileError(f"an {config.family} model has exactly one text encoder, "
                                     f"this config has {len(encoders)}")
            self.cond_stage_model = encoders[0]

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoders(self) -> list[nn.Module]:
        if self.config.is_sdxl:
            return list(self.conditioner.embedders)
        return [self.cond_stage_model]

    def text_encoder_prefixes(self) -> list[str]:
        if self.config.is_sdxl:
            return [f"conditioner.embedders.{i}." for i in range(len(self.config.text_encoders))]
        return ["cond_stage_model."]

    def component_params(self) -> dict[str, int]:
        """Parameter counts per component (for `sdloom info`)."""
        counts = {"unet": sum(p.numel() for p in self.unet.parameters()),
                  "vae": sum(p.numel() for p in self.vae.parameters())}
        for i, te in enumerate(self.text_encoders):
            counts[f"text_encoder{'' if i == 0 else f'_{i + 1}'}"] = sum(
                p.numel() for p in te.parameters())
        return counts

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype
