"""The T5 v1.1 encoder (Raffel et al. 2020; v1.1: gated-GELU, untied, no dropout) — SD3's T5-XXL.

Attribute paths equal transformers' T5EncoderModel keys, which SD3 single files store under
`text_encoders.t5xxl.transformer.` (`shared.weight`, `encoder.block.N.layer.0.SelfAttention.q`,
`encoder.block.N.layer.1.DenseReluDense.wi_0`, `encoder.final_layer_norm`, …), so loading is a
prefix strip. `encoder.embed_tokens.weight` (the tied copy some files hold) is read as `shared`.
Pre-norm RMS layers without bias; q·k is not scaled by 1/√d (T5 folds that into the init); one
learned bucketed relative-position bias, made by the first block and added in every block.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ModelFileError

EMBED_ALIAS = "encoder.embed_tokens.weight"  # transformers' tied copy of shared.weight


@dataclass(frozen=True)
class T5Config:
    """Shape of a T5 v1.1 encoder; defaults are T5-XXL (google/t5-v1_1-xxl, SD3/SD3.5/Flux)."""
    d_model: int = 4096
    d_kv: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_heads: int = 64
    vocab_size: int = 32128
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    feed_forward_proj: str = "gated-gelu"
    layer_norm_epsilon: float = 1e-6

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ModelFileError(f"T5 feed_forward_proj {self.feed_forward_proj!r}: only v1.1's "
                                 "'gated-gelu' is supported")

    @classmethod
    def detect(cls, shapes: dict[str, tuple]) -> T5Config:
        """Read the config from the tensor shapes of a transformers-layout state dict (no prefix).

        Not in the shapes, so assumed as in every T5 v1.1: max_distance 128, eps 1e-6, GELU(tanh)
        gating. num_heads is the second dim of relative_attention_bias [buckets, heads]; d_kv is
        q's output width / heads.
        """
        def need(key: str) -> tuple:
            if key not in shapes:
                raise ModelFileError(f"not a T5 encoder state dict: missing key {key!r}")
            return tuple(shapes[key])

        embed = shapes.get("shared.weight") or need(EMBED_ALIAS)
        vocab, d_model = embed
        buckets, heads = need("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
        inner = need("encoder.block.0.layer.0.SelfAttention.q.weight")[0]
        if inner % heads:
            raise ModelFileError(f"T5 attention width {inner} is not a multiple of {heads} heads")
        if "encoder.block.0.layer.1.DenseReluDense.wi.weight" in shapes:
            raise ModelFileError("T5 v1.0 (ReLU feed-forward, `DenseReluDense.wi`) is not supported")
        d_ff = need("encoder.block.0.layer.1.DenseReluDense.wi_0.weight")[0]
        blocks = {int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))}
        if blocks != set(range(len(blocks))):
            raise ModelFileError(f"T5 encoder blocks are not numbered 0..n-1: {sorted(blocks)}")
        return cls(d_model=d_model, d_kv=inner // heads, d_ff=d_ff, num_layers=len(blocks),
                   num_heads=heads, vocab_size=vocab, relative_attention_num_buckets=buckets)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bidirectional T5 bucket of key − query offsets (Mesh TensorFlow): half the buckets per sign;
    within a half, exact for |d| < num_buckets/4, then log-spaced up to max_distance, then one."""
    half = num_buckets // 2
    bucket = (rel > 0).long() * half
    rel = rel.abs()
    exact = half // 2
    # same float ops as the reference, so distances on a log-bin edge fall into the same bucket
    log = torch.log(rel.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    large = (exact + (log * (half - exact)).long()).clamp(max=half - 1)
    return bucket + torch.where(rel < exact, rel, large)


def _clamp_fp16(x: torch.Tensor) -> torch.Tensor:
    """transformers' fp16 guard: clip to the fp16 range (1000 below it once anything overflowed)."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)


class T5LayerNorm(nn.Module):
    """RMSNorm without bias or mean subtraction (Zhang & Sennrich 2019), statistics in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        var = x.float().pow(2).mean(-1, keepdim=True)
        x = x.float() * torch.rsqrt(var + self.eps)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


class T5Attention(nn.Module):
    """Multi-head self-attention with unscaled q·k plus the relative-position bias."""

    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        inner = cfg.num_heads * cfg.d_kv
        self.heads, self.cfg = cfg.num_heads, cfg
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        if has_bias:
            self.relative_attention_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)

    def position_bias(self, length: int, device: torch.device) -> torch.Tensor:
        """Bias [1, heads, L, L] from each (query i, key j) pair's bucket of j − i."""
        pos = torch.arange(length, device=device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.relative_attention_num_buckets,
                                           self.cfg.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = (proj(x).view(b, n, self.heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


class T5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.SelfAttention = T5Attention(cfg, has_bias)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), bias)


class T5DenseGatedActDense(nn.Module):
    """Gated-GELU feed-forward (Shazeer 2020): wo(gelu_tanh(wi_0 x) · wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        if h.dtype == torch.float16:
            # T5's wo outputs overflow fp16 (transformers keeps `wo` in fp32): compute it in fp32,
            # which also keeps the residual stream in fp32 from here on, as transformers' does
            return F.linear(h.float(), self.wo.weight.float())
        return self.wo(h)


class T5LayerFF(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.DenseReluDense = T5DenseGatedActDense(cfg)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class T5Block(nn.Module):
    def __init__(self, cfg: T5Config, has_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([T5LayerSelfAttention(cfg, has_bias), T5LayerFF(cfg)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = _clamp_fp16(self.layer[0](x, bias))
        return _clamp_fp16(self.layer[1](x))


class T5Stack(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.block = nn.ModuleList([T5Block(cfg, has_bias=i == 0) for i in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon)


class T5Encoder(nn.Module):
    """T5 encoder: ids [B, L] → last hidden state after final_layer_norm [B, L, d_model]."""

    def __init__(self, cfg: T5Config = T5Config()):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = T5Stack(cfg)
        self.register_load_state_dict_pre_hook(_read_embed_alias)

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """attention_mask [B, L] (1 = attend) hides padded keys; SD3 passes none (pads attended)."""
        x = self.shared(ids)
        first = self.encoder.block[0].layer[0].SelfAttention
        bias = first.position_bias(ids.shape[1], ids.device)
        if attention_mask is not None:
            hide = (attention_mask[:, None, None, :] == 0).to(bias.dtype) * torch.finfo(bias.dtype).min
            bias = bias + hide
        for block in self.encoder.block:
            x = block(x, bias)
        return self.encoder.final_layer_norm(x)


def _read_embed_alias(module, state_dict, prefix, *args) -> None:
    """Accept `encoder.embed_tokens.weight` for `shared.weight`; drop it when both are stored."""
    alias = state_dict.pop(prefix + EMBED_ALIAS, None)
    if alias is not None and prefix + "shared.weight" not in state_dict:
        state_dict[prefix + "shared.weight"] = alias
