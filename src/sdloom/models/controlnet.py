"""ControlNet (Zhang et al. 2023, `cldm.ControlNet`): a trainable copy of the U-Net's encoder and
middle block that reads a hint image and returns one zero-conv residual per skip connection plus
one for the middle block (13 for SD1/SD2, 10 for SDXL).

Attribute paths equal the original checkpoints' keys under `control_model.`: the U-Net's own
`time_embed`, `label_emb` (SDXL), `input_blocks`, `middle_block`, plus `input_hint_block.{0..14}`
(8 convs, SiLU between), `zero_convs.N.0` and `middle_block_out.0`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import UNetConfig
from ..errors import SdloomError
from .attention import SpatialTransformer
from .unet import Downsample, ResBlock, TimestepEmbedSequential, timestep_embedding

HINT_CHANNELS = (16, 16, 32, 32, 96, 96, 256)  # the hint embedder's widths (×8 downscale)


@dataclass(frozen=True)
class ControlNetConfig:
    """The U-Net encoder it copies, and the hint image's channels (3: RGB)."""
    unet: UNetConfig
    hint_channels: int = 3

    @property
    def residuals(self) -> int:
        """How many residuals it returns: one per encoder block, one for the middle."""
        u = self.unet
        levels = len(u.channel_mult)
        return 1 + levels * u.num_res_blocks + (levels - 1) + 1


def _zero_conv(ch: int) -> TimestepEmbedSequential:
    return TimestepEmbedSequential(nn.Conv2d(ch, ch, 1))


class ControlNet(nn.Module):
    """`forward(x, hint, timesteps, context, y=None)` → the residuals, shallowest first and the
    middle block's last."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.config = cfg
        u = cfg.unet
        mc, g = u.model_channels, u.num_groups
        ted = mc * u.time_embed_mult
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if u.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(u.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))
        hint: list[nn.Module] = []
        chans = (cfg.hint_channels, *HINT_CHANNELS)
        for i in range(len(HINT_CHANNELS)):
            stride = 2 if i in (2, 4, 6) else 1  # 16→32, 32→96, 96→256 halve the size
            hint += [nn.Conv2d(chans[i], chans[i + 1], 3, padding=1, stride=stride), nn.SiLU()]
        hint.append(nn.Conv2d(HINT_CHANNELS[-1], mc, 3, padding=1))
        self.input_hint_block = TimestepEmbedSequential(*hint)

        def transformer(ch: int, depth: int) -> SpatialTransformer:
            heads, hd = u.heads_for(ch)
            return SpatialTransformer(ch, heads, hd, depth, u.context_dim,
                                      u.use_linear_in_transformer, g)

        # the U-Net's encoder, block for block (models/unet.py), each with its zero conv
        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(u.in_channels, mc, 3, padding=1))])
        self.zero_convs = nn.ModuleList([_zero_conv(mc)])
        ch = mc
        levels = len(u.channel_mult)
        for level, mult in enumerate(u.channel_mult):
            for _ in range(u.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc, g)]
                ch = mult * mc
                if u.transformer_depth[level]:
                    layers.append(transformer(ch, u.transformer_depth[level]))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                self.zero_convs.append(_zero_conv(ch))
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                self.zero_convs.append(_zero_conv(ch))
        mid: list[nn.Module] = [ResBlock(ch, ted, ch, g)]
        if u.transformer_depth_middle:
            mid.append(transformer(ch, u.transformer_depth_middle))
        mid.append(ResBlock(ch, ted, ch, g))
        self.middle_block = TimestepEmbedSequential(*mid)
        self.middle_block_out = _zero_conv(ch)

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: torch.Tensor, y: torch.Tensor | None = None) -> list[torch.Tensor]:
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.unet.model_channels)
                              .to(dtype))
        if self.config.unet.adm_in_channels is not None:
            if y is None:
                raise SdloomError("this ControlNet needs the ADM vector y (SDXL)")
            emb = emb + self.label_emb(y.to(dtype))
        context = context.to(dtype)
        guided = self.input_hint_block(hint.to(dtype), emb, context)
        if guided.shape[-2:] != x.shape[-2:]:
            raise SdloomError(f"ControlNet hint of {hint.shape[-1]}x{hint.shape[-2]} pixels does "
                              f"not match a {x.shape[-1]}x{x.shape[-2]} latent (the hint is 8× "
                              "the latent size)")
        h = x.to(dtype)
        outs = []
        for i, (block, zero) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = block(h, emb, context)
            if i == 0:  # the hint joins after the first conv (cldm.ControlNet.forward)
                h = h + guided
            outs.append(zero(h, emb, context))
        h = self.middle_block(h, emb, context)
        outs.append(self.middle_block_out(h, emb, context))
        return outs
