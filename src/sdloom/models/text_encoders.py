"""CLIP text transformers (Radford et al. 2021) in the two key layouts SD checkpoints use.

"hf": transformers' CLIPTextModel names (OpenAI CLIP-L in SD1 and SDXL).
"openclip": open_clip names with fused q/k/v (OpenCLIP ViT-H in SD2, ViT-bigG in SDXL).
Both wrappers return (hidden states the U-Net reads, pooled projection or None).

No buffers anywhere: the loader builds on the meta device and fills only what the file holds,
so positions come from slicing the position table, never from a stored `position_ids`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from ..errors import ModelFileError, SdloomError
from .attention import sdpa_heads


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU: x·σ(1.702x)."""
    return x * torch.sigmoid(1.702 * x)


def _act(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    # module-level functions, not lambdas, so a model can be pickled or deep-copied (EMA)
    if name == "quick_gelu":
        return quick_gelu
    if name == "gelu":
        return F.gelu
    raise ModelFileError(f"unknown text encoder activation {name!r} (quick_gelu or gelu)")


# ------------------------------------------------------------------ transformers layout ("hf")

class HFAttention(nn.Module):
    """Causal multi-head self-attention with separate q/k/v projections."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = sdpa_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True)
        return self.out_proj(out)


class HFMLP(nn.Module):
    """Two-layer feed-forward, width → mlp_ratio·width → width."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class HFLayer(nn.Module):
    """Pre-norm transformer layer (transformers `CLIPEncoderLayer`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.self_attn = HFAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.mlp = HFMLP(cfg.width, cfg.width * cfg.mlp_ratio, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class HFEmbeddings(nn.Module):
    """Token and learned absolute position tables."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class HFEncoder(nn.Module):
    """The stack of layers (`text_model.encoder.layers.{n}`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(HFLayer(cfg) for _ in range(cfg.layers))


class HFTextTransformer(nn.Module):
    """transformers' `CLIPTextTransformer` (the `text_model.` prefix)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = HFEmbeddings(cfg)
        self.encoder = HFEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)


class CLIPTextModel(nn.Module):
    """transformers-layout CLIP text model (+ `text_projection` when projection_dim is set)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text_model = HFTextTransformer(cfg)
        if cfg.projection_dim:  # CLIPTextModelWithProjection's layout
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embeddings.token_embedding(ids)

    def positions(self, n: int) -> torch.Tensor:
        return self.text_model.embeddings.position_embedding.weight[:n]

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.encoder.layers

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_model.final_layer_norm(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        # without a projection, the pooled output is transformers' `pooler_output`
        return self.text_projection(pooled) if hasattr(self, "text_projection") else pooled


# ------------------------------------------------------------------ open_clip layout

class OpenCLIPAttention(nn.Module):
    """`nn.MultiheadAttention`'s parameters (fused in_proj), computed with SDPA."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)  # as nn.MultiheadAttention; no-op on meta

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        return self.out_proj(sdpa_heads(q, k, v, self.heads, causal=True))


class OpenCLIPMLP(nn.Module):
    """open_clip's feed-forward (`c_fc`, `c_proj`)."""

    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class OpenCLIPBlock(nn.Module):
    """open_clip `ResidualAttentionBlock`: pre-norm attention and MLP."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = OpenCLIPAttention(cfg.width, cfg.heads)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = OpenCLIPMLP(cfg.width, cfg.width * cfg.mlp_ratio, cfg.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class OpenCLIPTransformer(nn.Module):
    """The stack of blocks (`transformer.resblocks.{n}`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.resblocks = nn.ModuleList(OpenCLIPBlock(cfg) for _ in range(cfg.layers))


class OpenCLIPTextModel(nn.Module):
    """open_clip-layout text tower: fused in_proj, `positional_embedding`, `text_projection`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.max_positions, cfg.width))
        self.transformer = OpenCLIPTransformer(cfg)
        self.ln_final = nn.LayerNorm(cfg.width)
        # open_clip always has these two; SD2 never reads the projection, nothing reads the scale
        proj = cfg.projection_dim or cfg.width
        self.text_projection = nn.Parameter(torch.empty(cfg.width, proj))
        self.logit_scale = nn.Parameter(torch.full((), 4.6052))  # ln(100)
        nn.init.normal_(self.positional_embedding, std=0.01)  # open_clip's init; no-op on meta
        nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)

    def positions(self, n: int) -> torch.Tensor:
        return self.positional_embedding[:n]

    @property
    def layers(self) -> nn.ModuleList:
        return self.transformer.resblocks

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.text_projection


# ------------------------------------------------------------------ single-file wrappers

class TextEncoder(nn.Module):
    """Common forward of both layouts: (hidden [B,N,D] for the U-Net, pooled [B,P] or None)."""
    config: TextEncoderConfig

    def core(self) -> CLIPTextModel | OpenCLIPTextModel:
        raise NotImplementedError

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B,N] → embeddings [B,N,D] before positions (for textual inversion)."""
        return self.core().embed(ids)

    def wants_pooled(self) -> bool:
        """Whether forward returns a pooled vector: SDXL's bigG, or an hf model with projection."""
        cfg = self.config
        return cfg.pooled or (cfg.layout == "hf" and bool(cfg.projection_dim))

    def forward(self, ids: torch.Tensor, clip_skip: int = 1,
                inputs_embeds: torch.Tensor | None = None, project_pooled: bool = True
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Hidden state `hidden_layer - (clip_skip - 1)` (counted like transformers'
        `hidden_states`, -1 = last layer), optionally final-normed, and the pooled projection
        (`project_pooled=False`: the final-normed EOS token, transformers' `pooler_output`)."""
        cfg, m = self.config, self.core()
        layers = m.layers
        x = self.token_embedding(ids) if inputs_embeds is None else inputs_embeds
        x = x + m.positions(ids.shape[1]).to(x.dtype)
        idx = cfg.hidden_layer - (max(1, clip_skip) - 1)
        stop = len(layers) + 1 + idx  # layers to run for that hidden state (0 = embeddings)
        if stop < 0:
            raise SdloomError(f"clip skip {clip_skip} is deeper than this text encoder's "
                              f"{len(layers)} layers: use 1..{len(layers) + 2 + cfg.hidden_layer}")
        pool = self.wants_pooled()
        hidden = x
        for i, layer in enumerate(layers):
            if i >= stop and not pool:
                break  # SD2 never runs its last layer
            x = layer(x)
            if i + 1 == stop:
                hidden = x
        if cfg.final_norm_on_hidden:
            hidden = m.final_norm(hidden)
        pooled = None
        if pool:
            # the first end-of-text token: 49407 is the largest id, so argmax finds it whether
            # the padding is 49407 (SD1) or 0 (OpenCLIP)
            eos = ids.argmax(dim=-1)
            last = m.final_norm(x[torch.arange(x.shape[0], device=x.device), eos])
            # SD3 conditions on CLIP-L's unprojected pooled token (A1111 return_projected_pooled)
            pooled = m.project(last) if project_pooled else last
        return hidden, pooled


class FrozenCLIPEmbedder(TextEncoder):
    """SD1/SDXL CLIP-L: keys `…transformer.text_model.*` (+ `transformer.text_projection`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.transformer = CLIPTextModel(cfg)

    def core(self) -> CLIPTextModel:
        return self.transformer


class FrozenOpenCLIPEmbedder(TextEncoder):
    """SD2 OpenCLIP-H / SDXL bigG: keys `…model.transformer.resblocks.*`."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.config = cfg
        self.model = OpenCLIPTextModel(cfg)

    def core(self) -> OpenCLIPTextModel:
        return self.model


def build_text_encoder(cfg: TextEncoderConfig) -> TextEncoder:
    """The single-file wrapper for `cfg.layout`."""
    if cfg.layout == "hf":
        return FrozenCLIPEmbedder(cfg)
    if cfg.layout == "openclip":
        return FrozenOpenCLIPEmbedder(cfg)
    raise ModelFileError(f"unknown text encoder layout {cfg.layout!r} (hf or openclip)")
