"""CLIP text transformers (Radford et al. 2021) in the two key layouts SD checkpoints use.

"hf": transformers' CLIPTextModel names (OpenAI CLIP-L in SD1 and SDXL).
"openclip": open_clip names with fused q/k/v (OpenCLIP ViT-H in SD2, ViT-bigG in SDXL).
Both wrappers return (hidden states the U-Net reads, pooled projection or None).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import TextEncoderConfig
from .attention import sdpa_heads


def _act(name: str):
    if name == "quick_gelu":  # OpenAI CLIP's sigmoid approximation of GELU
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "gelu":
        return F.gelu
    raise ValueError(f"unknown activation {name!r}")


class HFAttention(nn.Module):
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
    def __init__(self, width: int, hidden: int, act: str):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)
        self.act = _act(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class HFLayer(nn.Module):
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
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.max_positions, cfg.width)


class HFEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(HFLayer(cfg) for _ in range(cfg.layers))


class HFTextTransformer(nn.Module):
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
        if cfg.projection_dim:
            self.text_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.text_model.embeddings.token_embedding(ids)

    def positions(self, n: int) -> torch.Tensor:
        return self.text_model.embeddings.position_embedding.weight[:n]

    @property
    def layers(self):
        return self.text_model.encoder.layers

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.text_model.final_layer_norm(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor | None:
        return self.text_projection(pooled) if hasattr(self, "text_projection") else None


class OpenCLIPBlock(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = nn.Module()
        self.attn.in_proj_weight = nn.Parameter(torch.empty(3 * cfg.width, cfg.width))
        self.attn.in_proj_bias = nn.Parameter(torch.empty(3 * cfg.width))
        self.attn.out_proj = nn.Linear(cfg.width, cfg.width)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = nn.Module()
        self.mlp.c_fc = nn.Linear(cfg.width, cfg.width * cfg.mlp_ratio)
        self.mlp.c_proj = nn.Linear(cfg.width * cfg.mlp_ratio, cfg.width)
        self.heads = cfg.heads
        self.act = _act(cfg.act)
        if not self.attn.in_proj_weight.is_meta:
            nn.init.xavier_uniform_(self.attn.in_proj_weight)
            nn.init.zeros_(self.attn.in_proj_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        q, k, v = F.linear(h, self.attn.in_proj_weight, self.attn.in_proj_bias).chunk(3, dim=-1)
        x = x + self.attn.out_proj(sdpa_heads(q, k, v, self.heads, causal=True))
        return x + self.mlp.c_proj(self.act(self.mlp.c_fc(self.ln_2(x))))


class OpenCLIPTransformer(nn.Module):
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
        self.text_projection = nn.Parameter(torch.empty(cfg.width, cfg.projection_dim or cfg.width))
        self.logit_scale = nn.Parameter(torch.full((), 4.6052))  # ln(100), unused by SD
        if not self.positional_embedding.is_meta:
            nn.init.normal_(self.positional_embedding, std=0.01)
            nn.init.normal_(self.text_projection, std=cfg.width ** -0.5)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids)

    def positions(self, n: int) -> torch.Tensor:
        return self.positional_embedding[:n]

    @property
    def layers(self):
        return self.transformer.resblocks

    def final_norm(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x)

    def project(self, pooled: torch.Tensor) -> torch.Tensor:
        return pooled @ self.text_projection


class TextEncoder(nn.Module):
    """Common forward of both layouts: (hidden [B,N,D] for the U-Net, pooled [B,P] or None)."""
    config: TextEncoderConfig

    def core(self) -> CLIPTextModel | OpenCLIPTextModel:
        raise NotImplementedError

    def token_embedding(self, ids: torch.Tensor) -> torch.Tensor:
        return self.core().embed(ids)

    def forward(self, ids: torch.Tensor, clip_skip: int = 1,
                inputs_embeds: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        cfg, m = self.config, self.core()
        layers = m.layers
        x = self.token_embedding(ids) if inputs_embeds is None else inputs_embeds
        x = x + m.positions(ids.shape[1]).to(x.dtype)
        # hidden index counted from the end, like transformers' hidden_states (-1 = last layer)
        idx = cfg.hidden_layer - (max(1, clip_skip) - 1)
        stop = len(layers) + 1 + idx  # number of layers to run for that hidden state
        if stop < 0:
            raise ValueError(f"clip skip {clip_skip} is deeper than the {len(layers)} layers")
        need_pooled = cfg.pooled or cfg.projection_dim is not None and cfg.layout == "hf"
        hidden = x if stop == 0 else None
        for i, layer in enumerate(layers):
            if i >= stop and not need_pooled:
                break
            x = layer(x)
            if i + 1 == stop:
                hidden = x
        if cfg.final_norm_on_hidden:
            hidden = m.final_norm(hidden)
        pooled = None
        if need_pooled:
            last = m.final_norm(x)
            # the pooled token is the first end-of-text token: the largest id (49407)
            pooled = m.project(last[torch.arange(ids.shape[0], device=ids.device),
                                    ids.argmax(dim=-1)])
        return hidden, pooled


class FrozenCLIPEmbedder(TextEncoder):
    """SD1/SDXL CLIP-L: keys `…transformer.text_model.*`."""

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
    if cfg.layout == "hf":
        return FrozenCLIPEmbedder(cfg)
    if cfg.layout == "openclip":
        return FrozenOpenCLIPEmbedder(cfg)
    raise ValueError(f"unknown text encoder layout {cfg.layout!r}")
