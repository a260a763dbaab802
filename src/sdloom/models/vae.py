"""AutoencoderKL (Rombach et al. 2022, LDM `model.py`): image ⇄ latent, f = 2^(levels-1).
Its Encoder and Decoder are also the VQ autoencoder's (models/vq.py).

Attribute paths equal the keys under `first_stage_model.` in the original checkpoints.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VAEConfig


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, plus a 1×1 `nin_shortcut` when the width changes."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1×1-conv projections."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q = nn.Conv2d(c, c, 1)
        self.k = nn.Conv2d(c, c, 1)
        self.v = nn.Conv2d(c, c, 1)
        self.proj_out = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.flatten(2).transpose(1, 2)[:, None] for t in (self.q(n), self.k(n), self.v(n)))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0].transpose(1, 2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3×3 conv after LDM's asymmetric (0, 1, 0, 1) padding."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # LDM's asymmetric padding


class Upsample(nn.Module):
    """Nearest-neighbour ×2, then a 3×3 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Mid(nn.Module):
    """Middle of encoder and decoder: resnet, attention, resnet."""

    def __init__(self, c: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(c, c, groups)
        self.attn_1 = AttnBlock(c, groups)
        self.block_2 = ResnetBlock(c, c, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


def _level(level: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """A level's resnets, each followed by its attention block where the level has them."""
    attn = getattr(level, "attn", None)
    for j, block in enumerate(level.block):
        h = block(h)
        if attn is not None:
            h = attn[j](h)
    return h


class Encoder(nn.Module):
    """Image → 2·z_channels moments; each `down.{i}` but the last halves the resolution."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.num_groups, cfg.ch
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        cin = ch
        for i, m in enumerate(cfg.ch_mult):
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                level.block.append(ResnetBlock(cin, ch * m, g))
                cin = ch * m
            if i in cfg.attn_levels:  # one attention after each resnet, as LDM's `down.{i}.attn`
                level.attn = nn.ModuleList(AttnBlock(cin, g) for _ in level.block)
            if i != len(cfg.ch_mult) - 1:
                level.downsample = Downsample(cin)
            self.down.append(level)
        self.mid = Mid(cin, g)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        # KL: mean and log-variance (LDM's double_z); VQ: the latent itself
        moments = cfg.z_channels if cfg.n_embed else 2 * cfg.z_channels
        self.conv_out = nn.Conv2d(cin, moments, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for level in self.down:
            h = _level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent → image; `up.{i}` is indexed by resolution (up.0 = full size), run top-down."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        g, ch = cfg.num_groups, cfg.ch
        cin = ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = Mid(cin, g)
        levels: list[nn.Module] = []
        for i in reversed(range(len(cfg.ch_mult))):  # lowest resolution first; stored by level
            level = nn.Module()
            level.block = nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                level.block.append(ResnetBlock(cin, ch * cfg.ch_mult[i], g))
                cin = ch * cfg.ch_mult[i]
            if i in cfg.attn_levels:
                level.attn = nn.ModuleList(AttnBlock(cin, g) for _ in level.block)
            if i != 0:
                level.upsample = Upsample(cin)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out = nn.GroupNorm(g, cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, cfg.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for level in reversed(self.up):
            h = _level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class AutoencoderKL(nn.Module):
    """KL-regularised autoencoder: `encode` gives posterior moments, `decode` maps back.

    With `use_quant_conv=False` (SD3, Flux) the encoder's moments are the posterior directly and
    no quant_conv / post_quant_conv modules exist, so a strict load of those files works.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        if cfg.n_embed:
            raise ValueError("a VAE config with n_embed codes is a VQModel's (models/vq.py)")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        if cfg.use_quant_conv:
            self.quant_conv = nn.Conv2d(2 * cfg.z_channels, 2 * cfg.embed_dim, 1)
            self.post_quant_conv = nn.Conv2d(cfg.embed_dim, cfg.z_channels, 1)
        elif cfg.embed_dim != cfg.z_channels:
            raise ValueError(f"a VAE without quant_conv needs embed_dim == z_channels, got "
                             f"{cfg.embed_dim} and {cfg.z_channels}")

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] → (mean, logvar) of the latent posterior."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Posterior sample (unscaled) → image in about [-1, 1]."""
        return self.decoder(self.post_quant_conv(z) if self.config.use_quant_conv else z)

    def latent_from_image(self, x: torch.Tensor, generator: torch.Generator | None = None,
                          sample: bool = False) -> torch.Tensor:
        """Image in [-1, 1] → diffusion latent (z - shift) · scale; z = mean or a sample."""
        return self.latent_from_posterior(*self.encode(x), generator, sample)

    def latent_from_posterior(self, mean: torch.Tensor, logvar: torch.Tensor,
                              generator: torch.Generator | None = None,
                              sample: bool = False) -> torch.Tensor:
        """Posterior (mean, logvar) → diffusion latent (z - shift) · scale (tiled_vae uses it)."""
        z = mean
        if sample:
            # drawn on the generator's device (CPU by A1111 convention) in fp32, then moved, so a
            # seed gives the same latent on every device and dtype
            dev = generator.device if generator is not None else torch.device("cpu")
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32, device=dev)
            z = mean + torch.exp(0.5 * logvar) * eps.to(mean.device, mean.dtype)
        return (z - self.config.shift_factor) * self.config.scale_factor

    def image_from_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Diffusion latent → image in about [-1, 1] (undoes `latent_from_image`'s scaling)."""
        return self.decode(z / self.config.scale_factor + self.config.shift_factor)
