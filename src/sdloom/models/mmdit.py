"""MMDiT, the SD3 / SD3.5 denoiser (Esser et al. 2024, "Scaling Rectified Flow Transformers").

Attribute paths equal the original single-file keys under `model.diffusion_model.` (`pos_embed`,
`x_embedder.proj`, `joint_blocks.N.x_block.attn.qkv`, `final_layer.adaLN_modulation.1`, …), so
an original checkpoint loads after a prefix strip. Text and image tokens keep their own weights
and meet in one joint attention; SD3.5 adds RMS qk-norm and (medium) a second image-only
self-attention in the first blocks. Flow matching: the model takes t = σ·1000.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError, SdloomError

# Without qk-norm weights nothing in the shapes gives the head width: the original code fixes it
# at 64 (hidden = 64·depth, heads = depth) for every published SD3 / SD3.5 model.
DEFAULT_HEAD_DIM = 64


@dataclass(frozen=True)
class MMDiTConfig:
    """Shape of an MMDiT; defaults are SD3-medium."""
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    depth: int = 24
    hidden_size: int = 1536
    num_heads: int = 24
    context_dim: int = 4096       # T5 width; CLIP-L‖G is zero-padded to it
    pooled_dim: int = 2048        # CLIP-L pooled ‖ CLIP-G pooled
    pos_embed_max_size: int = 192
    qk_norm: bool = False         # RMSNorm on q and k per head (SD3.5)
    dual_attention_layers: tuple[int, ...] = ()  # blocks with a 2nd x self-attention (3.5 medium)
    mlp_ratio: int = 4

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise SdloomError(f"MMDiT hidden_size {self.hidden_size} is not a multiple of "
                              f"num_heads {self.num_heads}")
        if any(not 0 <= i < self.depth for i in self.dual_attention_layers):
            raise SdloomError(f"MMDiT dual_attention_layers {self.dual_attention_layers} outside "
                              f"0..{self.depth - 1}")

    @classmethod
    def detect(cls, shapes: dict[str, tuple]) -> MMDiTConfig:
        """Read the config from the tensor shapes of an original-layout state dict (no prefix)."""
        def need(key: str) -> tuple:
            if key not in shapes:
                raise ModelFileError(f"not an MMDiT state dict: missing key {key!r}")
            return tuple(shapes[key])

        hidden, in_ch, p, _ = need("x_embedder.proj.weight")
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"joint_blocks\.(\d+)\.", k))}
        if not blocks or blocks != set(range(max(blocks) + 1)):
            raise ModelFileError(f"MMDiT joint_blocks are not numbered 0..n-1: {sorted(blocks)}")
        depth = max(blocks) + 1
        out_ch = need("final_layer.linear.weight")[0] // (p * p)
        n_pos = need("pos_embed")[1]
        max_size = math.isqrt(n_pos)
        if max_size * max_size != n_pos:
            raise ModelFileError(f"MMDiT pos_embed has {n_pos} positions, not a square grid")
        ln_q = shapes.get("joint_blocks.0.x_block.attn.ln_q.weight")
        # RMSNorm over one head: its weight length is the head width
        head_dim = int(ln_q[0]) if ln_q is not None else DEFAULT_HEAD_DIM
        if hidden % head_dim:
            raise ModelFileError(f"MMDiT width {hidden} is not a multiple of the head width "
                                 f"{head_dim}")
        mlp = need("joint_blocks.0.x_block.mlp.fc1.weight")[0]
        if mlp % hidden:
            raise ModelFileError(f"MMDiT mlp width {mlp} is not a multiple of {hidden}")
        dual = tuple(sorted(i for i in blocks
                            if f"joint_blocks.{i}.x_block.attn2.qkv.weight" in shapes))
        return cls(patch_size=p, in_channels=in_ch, out_channels=out_ch, depth=depth,
                   hidden_size=hidden, num_heads=hidden // head_dim,
                   context_dim=need("context_embedder.weight")[1],
                   pooled_dim=need("y_embedder.mlp.0.weight")[1], pos_embed_max_size=max_size,
                   qk_norm=ln_q is not None, dual_attention_layers=dual, mlp_ratio=mlp // hidden)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: per-sample affine on [B, L, C] from [B, C] shift and scale (DiT)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed(dim: int, grid: int) -> torch.Tensor:
    """2-D sin-cos position table [grid², dim] (MAE): first half encodes rows, second columns."""
    def one_axis(pos: torch.Tensor, d: int) -> torch.Tensor:
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2))
        out = pos.reshape(-1, 1).double() * omega
        return torch.cat([out.sin(), out.cos()], dim=1)
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    # the original grid puts the column (w) coordinate first
    return torch.cat([one_axis(cols, dim // 2), one_axis(rows, dim // 2)], dim=1).float()


def timestep_embedding(t: torch.Tensor, dim: int = 256,
                       max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (fractional) timesteps, cos half first (DiT `TimestepEmbedder`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32,
                                                             device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class PatchEmbed(nn.Module):
    """p×p patches → tokens by a strided conv."""

    def __init__(self, patch: int, in_ch: int, hidden: int):
        super().__init__()
        self.proj = nn.Conv2d(in_ch, hidden, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Embedder(nn.Module):
    """Two-layer SiLU MLP (`t_embedder.mlp`, `y_embedder.mlp`)."""

    def __init__(self, in_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class Mlp(nn.Module):
    """Transformer feed-forward with tanh-approximated GELU."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SelfAttention(nn.Module):
    """Fused qkv projection, optional per-head RMS qk-norm, output projection (none if pre-only)."""

    def __init__(self, dim: int, heads: int, qk_norm: bool, pre_only: bool = False):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        if qk_norm:
            self.ln_q = nn.RMSNorm(dim // heads, eps=1e-6)
            self.ln_k = nn.RMSNorm(dim // heads, eps=1e-6)
        else:
            self.ln_q = self.ln_k = None
        self.proj = None if pre_only else nn.Linear(dim, dim)

    def qkv_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """[B, L, C] → q, k, v as [B, heads, L, head_dim], q and k normed."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        if self.ln_q is not None:
            q, k = self.ln_q(q), self.ln_k(k)
        return q, k, v


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA on [B, H, L, D] heads → [B, L, H·D]."""
    out = F.scaled_dot_product_attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


class DismantledBlock(nn.Module):
    """One stream (image `x_block` or text `context_block`) of a joint block, split around the
    shared attention. adaLN chunks, in stored order: pre-only (shift, scale); plain (shift, scale,
    gate) for attention and for the MLP; dual adds (shift, scale, gate) for `attn2`."""

    def __init__(self, cfg: MMDiTConfig, pre_only: bool = False, dual: bool = False):
        super().__init__()
        c = cfg.hidden_size
        self.pre_only, self.dual = pre_only, dual
        self.norm1 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(c, cfg.num_heads, cfg.qk_norm, pre_only)
        self.attn2 = SelfAttention(c, cfg.num_heads, cfg.qk_norm) if dual else None
        if not pre_only:
            self.norm2 = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(c, c * cfg.mlp_ratio)
        n_mod = 2 if pre_only else 9 if dual else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, n_mod * c))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """Modulated q, k, v of this stream, and what post_attention needs."""
        mod = self.adaLN_modulation(c).chunk(2 if self.pre_only else 9 if self.dual else 6, dim=1)
        h = self.norm1(x)
        qkv = self.attn.qkv_heads(modulate(h, mod[0], mod[1]))
        # attn2 sees the same normed input as attn (before attn's residual), its own modulation
        qkv2 = self.attn2.qkv_heads(modulate(h, mod[6], mod[7])) if self.dual else None
        return qkv, qkv2, mod

    def post_attention(self, attn: torch.Tensor, x: torch.Tensor, qkv2, mod) -> torch.Tensor:
        _, _, gate, shift_mlp, scale_mlp, gate_mlp = mod[:6]
        x = x + gate.unsqueeze(1) * self.attn.proj(attn)
        if self.dual:
            x = x + mod[8].unsqueeze(1) * self.attn2.proj(attend(*qkv2))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class JointBlock(nn.Module):
    """Text and image streams with their own weights, one attention over both token sets."""

    def __init__(self, cfg: MMDiTConfig, index: int):
        super().__init__()
        self.context_block = DismantledBlock(cfg, pre_only=index == cfg.depth - 1)
        self.x_block = DismantledBlock(cfg, dual=index in cfg.dual_attention_layers)

    def forward(self, context: torch.Tensor, x: torch.Tensor, c: torch.Tensor):
        c_qkv, _, c_mod = self.context_block.pre_attention(context, c)
        x_qkv, x_qkv2, x_mod = self.x_block.pre_attention(x, c)
        n_ctx = context.shape[1]
        out = attend(*(torch.cat(pair, dim=2) for pair in zip(c_qkv, x_qkv)))
        x = self.x_block.post_attention(out[:, n_ctx:], x, x_qkv2, x_mod)
        if self.context_block.pre_only:  # the last block's text output is never read
            return None, x
        return self.context_block.post_attention(out[:, :n_ctx], context, None, c_mod), x


class FinalLayer(nn.Module):
    """adaLN (stored as shift, scale) then a linear to p·p·out per token."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        c = cfg.hidden_size
        self.norm_final = nn.LayerNorm(c, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(c, cfg.patch_size ** 2 * cfg.out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(c, 2 * c))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    """SD3 / SD3.5 transformer: (latent, t = σ·1000, context, pooled y) → velocity."""

    def __init__(self, cfg: MMDiTConfig):
        super().__init__()
        self.config = cfg
        c = cfg.hidden_size
        m = cfg.pos_embed_max_size
        # always overwritten by a checkpoint; a fresh model starts from the sin-cos table
        self.register_buffer("pos_embed", sincos_pos_embed(c, m).unsqueeze(0))
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, c)
        self.t_embedder = Embedder(256, c)
        self.y_embedder = Embedder(cfg.pooled_dim, c)
        self.context_embedder = nn.Linear(cfg.context_dim, c)
        self.joint_blocks = nn.ModuleList(JointBlock(cfg, i) for i in range(cfg.depth))
        self.final_layer = FinalLayer(cfg)

    def cropped_pos_embed(self, h: int, w: int) -> torch.Tensor:
        """The h×w window at the centre of the max_size² table, as [1, h·w, C]."""
        m = self.config.pos_embed_max_size
        if h > m or w > m:
            p = self.config.patch_size
            raise SdloomError(f"latent {h * p}×{w * p} is larger than this model's position "
                              f"table allows ({m * p}×{m * p} latent pixels)")
        top, left = (m - h) // 2, (m - w) // 2
        grid = self.pos_embed.view(1, m, m, -1)[:, top:top + h, left:left + w]
        return grid.reshape(1, h * w, -1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                y: torch.Tensor) -> torch.Tensor:
        p = self.config.patch_size
        b, _, height, width = x.shape
        if height % p or width % p:
            # diffusers' pipeline refuses these sizes and its model silently drops the remainder
            raise SdloomError(f"latent size {height}×{width} is not a multiple of the MMDiT "
                              f"patch size {p} (image sides must be multiples of {8 * p})")
        h, w = height // p, width // p
        tokens = self.x_embedder(x) + self.cropped_pos_embed(h, w).to(x.dtype)
        t = t.expand(b) if t.ndim == 0 else t
        c = self.t_embedder(timestep_embedding(t).to(x.dtype)) + self.y_embedder(y)
        ctx = self.context_embedder(context)
        for block in self.joint_blocks:
            ctx, tokens = block(ctx, tokens, c)
        out = self.final_layer(tokens, c)  # [B, h·w, p·p·out]
        out = out.view(b, h, w, p, p, self.config.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(b, -1, height, width)
