"""VQModel: LDM's VQ-regularised autoencoder (`ldm.models.autoencoder.VQModel`; VQGAN, Esser et
al. 2021; the quantiser of VQ-VAE, van den Oord et al. 2017), e.g. LDM's vq-f4 under LDSR.

The encoder and decoder are AutoencoderKL's (models/vae.py) with `double_z` off; between them
quant_conv, the vector quantiser `quantize.embedding` ([n_embed, embed_dim]) and
post_quant_conv. Attribute paths equal the original keys (also diffusers `VQModel`'s names for
the quantiser and the convs). Diffusion runs on the latent before quantisation; `decode`
quantises it first, as LDM's `VQModelInterface.decode` and diffusers' `VQModel.decode` do.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import VAEConfig
from .vae import Decoder, Encoder

CHUNK = 4096  # latent vectors per distance matrix: 4096 × 8192 codes is 128 MiB in fp32


class VectorQuantizer(nn.Module):
    """Nearest codebook entry per latent vector (squared Euclidean distance)."""

    def __init__(self, n_embed: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(n_embed, dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_embed, 1.0 / n_embed)  # as LDM/taming

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] latent → [B, H, W] code indices (in chunks, so memory stays bounded)."""
        b, c, h, w = z.shape
        flat = z.detach().permute(0, 2, 3, 1).reshape(-1, c).float()
        e = self.embedding.weight.detach().float()
        e2 = e.pow(2).sum(1)
        out = [(part.pow(2).sum(1, keepdim=True) - 2 * part @ e.t() + e2).argmin(1)
               for part in flat.split(CHUNK)]
        return torch.cat(out).view(b, h, w)

    def lookup(self, idx: torch.Tensor) -> torch.Tensor:
        """[B, H, W] indices → [B, C, H, W] codebook vectors (differentiable in the codebook)."""
        return self.embedding(idx).permute(0, 3, 1, 2)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(quantised latent with the straight-through gradient to z, indices)."""
        idx = self.indices(z)
        q = self.lookup(idx).to(z.dtype)
        return z + (q - z).detach(), idx


class VQModel(nn.Module):
    """Image ⇄ latent through a codebook: `encode` gives the unquantised latent, `decode`
    quantises it and decodes."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.n_embed < 1 or not cfg.use_quant_conv:
            raise ValueError("a VQModel needs n_embed ≥ 1 codes and quant convs")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.embed_dim, 1)
        self.quantize = VectorQuantizer(cfg.n_embed, cfg.embed_dim)
        self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Image in [-1, 1] → latent before quantisation."""
        return self.quant_conv(self.encoder(x))

    def decode(self, h: torch.Tensor, quantize: bool = True) -> torch.Tensor:
        """Latent → image in about [-1, 1]; quantised first unless `quantize` is off."""
        if quantize:
            h = self.quantize(h)[0]
        return self.decoder(self.post_quant_conv(h))

    def latent_from_image(self, x: torch.Tensor, generator: torch.Generator | None = None,
                          sample: bool = False) -> torch.Tensor:
        """Image → diffusion latent (h − shift)·scale; deterministic (`sample` is ignored)."""
        return (self.encode(x) - self.config.shift_factor) * self.config.scale_factor

    def image_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latent → image (quantised, then decoded)."""
        return self.decode(z / self.config.scale_factor + self.config.shift_factor)
