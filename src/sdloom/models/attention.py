"""Attention and the spatial transformer of the LDM U-Net (Rombach et al. 2022, `attention.py`).

Attribute names equal the original checkpoint keys (`to_q`, `to_out.0`, `ff.net.0.proj`, …).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def sdpa_heads(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
               mask: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
    """Multi-head scaled dot-product attention on [B, N, H*D] tensors."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal)
    return out.transpose(1, 2).reshape(b, n, inner)


class CrossAttention(nn.Module):
    """Self-attention (context=None) or cross-attention onto the text context."""
    # IP-Adapter (Ye et al. 2023): (key, value, weight) triples of image tokens that the query
    # also attends to, each result added weighted; set for one U-Net call by
    # models.ip_adapter.IPAdaptedModel, None otherwise
    image_kv: list[tuple[torch.Tensor, torch.Tensor, float]] | None = None

    def __init__(self, query_dim: int, context_dim: int | None, heads: int, head_dim: int):
        super().__init__()
        inner = heads * head_dim
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        # [1]: the original's dropout slot (p = 0), an Identity: a no-op Dropout costs 2.5 µs
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Identity())

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        ctx = x if context is None else context
        q = self.to_q(x)
        out = sdpa_heads(q, self.to_k(ctx), self.to_v(ctx), self.heads)
        for k, v, weight in self.image_kv or ():
            out = out + weight * sdpa_heads(q, k.to(q.dtype), v.to(q.dtype), self.heads)
        return self.to_out(out)


class GEGLU(nn.Module):
    """GELU-gated linear unit (Shazeer 2020), as the LDM feed-forward uses."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # [1]: the original's dropout slot (p = 0), an Identity: a no-op Dropout costs 2.5 µs
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention, GEGLU feed-forward; each residual.

    `disable_self_attn` (LDM): attn1 attends to the context too, so both are cross-attention."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int,
                 disable_self_attn: bool = False):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(dim, context_dim if disable_self_attn else None, heads,
                                    head_dim)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, context_dim, heads, head_dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    # reference-only control (models/reference.py) sets this for the length of one call
    reference = None

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        if self.reference is not None and not self.disable_self_attn:
            x = x + self.reference.self_attention(self.attn1, h)
        else:
            x = x + self.attn1(h, context if self.disable_self_attn else None)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Image features → tokens → transformer blocks → image features (+ residual).

    SD1 projects with 1×1 convolutions; SD2/SDXL with linear layers (`use_linear`)."""

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear: bool, num_groups: int = 32, disable_self_attn: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(num_groups, channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(channels, inner)
            self.proj_out = nn.Linear(inner, channels)
        else:
            self.proj_in = nn.Conv2d(channels, inner, 1)
            self.proj_out = nn.Conv2d(inner, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, disable_self_attn)
            for _ in range(depth))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        res = x
        x = self.norm(x)
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)
        if self.use_linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            x = self.proj_out(x)
        return x + res
