"""Tiny random SD-shaped models for end-to-end tests (f = 8 VAE, CLIP-style text encoder)."""
from __future__ import annotations

import torch

from sdloom.config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from sdloom.families.sd import LatentDiffusion

TINY_SD1 = ModelConfig(
    "sd1",
    UNetConfig(model_channels=32, channel_mult=(1, 2), num_res_blocks=1, transformer_depth=(1, 1),
               transformer_depth_middle=1, num_heads=2, context_dim=32, num_groups=8),
    VAEConfig(ch=16, ch_mult=(1, 1, 2, 2), num_res_blocks=1, num_groups=8),
    (TextEncoderConfig(width=32, layers=2, heads=2),), default_size=64, name="")


def tiny_model(cfg: ModelConfig = TINY_SD1, seed: int = 0) -> LatentDiffusion:
    torch.manual_seed(seed)
    m = LatentDiffusion(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial norms and biases so a wrong wiring shows
        for name, p in m.named_parameters():
            if p.ndim == 1 and name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return m
