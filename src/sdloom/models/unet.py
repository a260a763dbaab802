"""The LDM/SGM U-Net (`openaimodel.UNetModel`) for SD 1.x, SD 2.x, SDXL and their inpaint variants.

Attribute paths equal the keys under `model.diffusion_model.` in the original checkpoints.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import UNetConfig
from ..errors import SdloomError
from .attention import SpatialTransformer


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (Vaswani et al. 2017), cosines first as in LDM."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                           device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block with an additive timestep embedding (Ho et al. 2020)."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, channels), nn.SiLU(),
                                       nn.Conv2d(channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        # [2]: the original's dropout slot (p = 0), an Identity that keeps the layer indices
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels), nn.SiLU(),
                                        nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip_connection = (nn.Identity() if channels == out_channels
                                else nn.Conv2d(channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # to the size of the skip connection it meets next, so latents whose sides are not
        # multiples of 8 (any image size that is a multiple of 8 pixels) come back to their
        # size, as the original SGM code and ComfyUI do; plain 2x otherwise
        if size is None:
            return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class AttentionBlock(nn.Module):
    """LDM's legacy `AttentionBlock` (openaimodel, `QKVAttentionLegacy`): GroupNorm, one 1×1
    conv to q, k, v interleaved per head ([heads × (q|k|v) × head_dim] channels), multi-head
    self-attention over the pixels, a 1×1 output conv, residual. No text (LDSR's U-Net)."""

    def __init__(self, channels: int, heads: int, groups: int):
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv1d(channels, channels * 3, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat)).reshape(b, self.heads, 3, c // self.heads, -1)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(2))  # [B, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)
        return (flat + self.proj_out(out)).reshape(b, c, *spatial)


class TimestepEmbedSequential(nn.Sequential):
    """A sequence whose ResBlocks see the timestep embedding and transformers see the context."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor,
                out_size: tuple[int, int] | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, Upsample):
                x = layer(x, out_size)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """ε/v-predicting U-Net: `forward(x, timesteps, context, y=None)`."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        self.gradient_checkpointing = False
        mc, g = cfg.model_channels, cfg.num_groups
        ted = mc * cfg.time_embed_mult
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.adm_in_channels is not None:
            self.label_emb = nn.Sequential(nn.Sequential(
                nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))
        elif cfg.num_classes is not None:  # LDM `num_classes`: y holds integer labels
            self.label_emb = nn.Embedding(cfg.num_classes, ted)

        def transformer(ch: int, depth: int, level: int | None = None) -> nn.Module:
            heads, hd = cfg.heads_for(ch)
            if not cfg.use_spatial_transformer:
                return AttentionBlock(ch, heads, g)
            no_self = (level is not None and cfg.disable_self_attentions is not None
                       and bool(cfg.disable_self_attentions[level]))
            return SpatialTransformer(ch, heads, hd, depth, cfg.context_dim,
                                      cfg.use_linear_in_transformer, g, no_self)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(cfg.in_channels, mc, 3, padding=1))])
        skip_chans = [mc]
        ch = mc
        levels = len(cfg.channel_mult)
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers: list[nn.Module] = [ResBlock(ch, ted, mult * mc, g)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level], level))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_chans.append(ch)
            if level != levels - 1:
                self.input_blocks.append(TimestepEmbedSequential(Downsample(ch)))
                skip_chans.append(ch)

        mid: list[nn.Module] = [ResBlock(ch, ted, ch, g)]
        if cfg.transformer_depth_middle:
            mid.append(transformer(ch, cfg.transformer_depth_middle))
        mid.append(ResBlock(ch, ted, ch, g))
        self.middle_block = TimestepEmbedSequential(*mid)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(cfg.channel_mult))):
            for i in range(cfg.num_res_blocks + 1):
                layers = [ResBlock(ch + skip_chans.pop(), ted, mult * mc, g)]
                ch = mult * mc
                if cfg.transformer_depth[level]:
                    layers.append(transformer(ch, cfg.transformer_depth[level], level))
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(nn.GroupNorm(g, ch), nn.SiLU(),
                                 nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _run(self, block: nn.Module, h: torch.Tensor, emb: torch.Tensor,
             context: torch.Tensor, out_size: tuple[int, int] | None = None) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, emb, context, out_size, use_reentrant=False)
        return block(h, emb, context, out_size)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None,
                y: torch.Tensor | None = None,
                control: list[torch.Tensor] | None = None) -> torch.Tensor:
        """`control`: ControlNet residuals, one per skip connection and the middle block's
        last; added as the original ControlLDM does (to `h` after the middle block and to each
        skip as the decoder pops it)."""
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(x.shape[0])
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, self.config.model_channels).to(dtype))
        if self.config.adm_in_channels is not None:
            if y is None:
                raise SdloomError("this U-Net needs the ADM vector y (pooled text + size "
                                  "conditioning)")
            emb = emb + self.label_emb(y.to(dtype))
        elif self.config.num_classes is not None:
            if y is None:
                raise SdloomError("this U-Net needs class labels y (the x4 upscaler's noise "
                                  "level)")
            emb = emb + self.label_emb(y.long().expand(x.shape[0])).to(dtype)
        h = x.to(dtype)
        context = context.to(dtype) if context is not None else None  # None: no text (LDSR)
        skips = []
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        control = list(control) if control is not None else None
        if control is not None:
            h = h + control.pop().to(h.dtype)
        for block in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control.pop().to(skip.dtype)
            h = torch.cat([h, skip], dim=1)
            h = self._run(block, h, emb, context, tuple(skips[-1].shape[-2:]) if skips else None)
        return self.out(h)


def sdxl_adm(pooled: torch.Tensor, original_size: tuple[int, int], crop: tuple[int, int],
             target_size: tuple[int, int] | None = None,
             aesthetic_score: float | None = None) -> torch.Tensor:
    """SDXL's ADM vector: pooled text ⊕ 256-d sinusoidal embeddings of (h, w) sizes and crop.

    Base: original size, crop top-left, target size (2816 = 1280 + 6·256). Refiner: original
    size, crop, aesthetic score (2560 = 1280 + 5·256) — Podell et al. 2023, §2.2."""
    vals = [*original_size, *crop]
    vals += [aesthetic_score] if aesthetic_score is not None else [*(target_size or original_size)]
    t = torch.tensor(vals, dtype=torch.float32, device=pooled.device)
    emb = timestep_embedding(t, 256).flatten()
    return torch.cat([pooled.float(), emb.expand(pooled.shape[0], -1)], dim=1).to(pooled.dtype)
