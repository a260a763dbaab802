"""CLIP vision tower (Radford et al. 2021; ViT, Dosovitskiy et al. 2021) in transformers'
`CLIPVisionModelWithProjection` key layout, and CLIPImageProcessor's preprocessing.

Class token + patch embeddings + learned positions, `pre_layrnorm` (sic, as the checkpoints
spell it), pre-LN layers, `post_layernorm` on the class token, `visual_projection`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..errors import ModelFileError
from .attention import sdpa_heads
from .text_encoders import HFAttention, HFMLP

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# heads and activation by width where no config.json says: OpenAI ViT-B/L (quick_gelu),
# OpenCLIP ViT-H and bigG (gelu) — the image encoders IP-Adapters are trained on
_PRESETS = {768: (12, "quick_gelu"), 1024: (16, "quick_gelu"), 1280: (16, "gelu"),
            1664: (16, "gelu")}


@dataclass(frozen=True)
class CLIPVisionConfig:
    width: int = 1280
    layers: int = 32
    heads: int = 16
    patch: int = 14
    image_size: int = 224
    projection_dim: int = 1024
    mlp_hidden: int = 5120
    act: str = "gelu"
    eps: float = 1e-5

    @classmethod
    def detect(cls, shapes: dict[str, tuple[int, ...]], hf: dict | None = None
               ) -> CLIPVisionConfig:
        """From key shapes; heads, activation and eps from transformers' config.json when
        given, else by width (_PRESETS)."""
        need = ("vision_model.embeddings.patch_embedding.weight",
                "vision_model.embeddings.position_embedding.weight", "visual_projection.weight",
                "vision_model.encoder.layers.0.mlp.fc1.weight")
        for k in need:
            if k not in shapes:
                raise ModelFileError(f"not a CLIP vision model: key {k!r} is missing")
        width, _, patch, _ = shapes[need[0]]
        positions = shapes[need[1]][0]
        layers = 1 + max(int(k.split(".")[3]) for k in shapes
                         if k.startswith("vision_model.encoder.layers."))
        if hf is not None:
            heads, act = hf["num_attention_heads"], hf.get("hidden_act", "quick_gelu")
            eps = hf.get("layer_norm_eps", 1e-5)
        elif width in _PRESETS:
            (heads, act), eps = _PRESETS[width], 1e-5
        else:
            raise ModelFileError(f"CLIP vision width {width} is not a known model: put its "
                                 "transformers config.json next to the weights")
        return cls(width, layers, heads, patch, int(round((positions - 1) ** 0.5)) * patch,
                   shapes[need[2]][0], shapes[need[3]][0], act, eps)


class VisionAttention(HFAttention):
    """transformers' CLIPAttention without the text tower's causal mask."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = sdpa_heads(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(out)


class VisionLayer(nn.Module):
    """Pre-norm layer (`CLIPEncoderLayer`)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.self_attn = VisionAttention(cfg.width, cfg.heads)
        self.layer_norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = HFMLP(cfg.width, cfg.mlp_hidden, cfg.act)
        self.layer_norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.zeros(cfg.width))
        self.patch_embedding = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch, bias=False)
        n = (cfg.image_size // cfg.patch) ** 2 + 1
        self.position_embedding = nn.Embedding(n, cfg.width)

    def forward(self, px: torch.Tensor) -> torch.Tensor:
        x = self.patch_embedding(px.to(self.patch_embedding.weight.dtype)).flatten(2)
        x = x.transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        return torch.cat([cls, x], dim=1) + self.position_embedding.weight.to(x.dtype)


class VisionEncoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.layers))


class VisionTransformer(nn.Module):
    """`vision_model.`: embeddings, pre-norm, layers, post-norm of the class token."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.encoder = VisionEncoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=cfg.eps)


class CLIPVisionModel(nn.Module):
    """`CLIPVisionModelWithProjection`: pixels → (image embeds [B, P], hidden states)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)
        self.visual_projection = nn.Linear(cfg.width, cfg.projection_dim, bias=False)

    def forward(self, px: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """px: [B, 3, S, S] normalised (`preprocess`). hidden states as transformers'
        `hidden_states`: [0] after the pre-norm, [i] after layer i."""
        vm = self.vision_model
        x = vm.pre_layrnorm(vm.embeddings(px))
        hidden = [x]
        for layer in vm.encoder.layers:
            x = layer(x)
            hidden.append(x)
        return self.visual_projection(vm.post_layernorm(x[:, 0])), hidden


def preprocess(images: list[Image.Image], size: int = 224) -> torch.Tensor:
    """CLIPImageProcessor: shortest side to `size` (bicubic), centre crop, CLIP mean/std."""
    out = []
    for im in images:
        im = im.convert("RGB")
        w, h = im.size
        short, long = (w, h) if w <= h else (h, w)
        new_long = int(size * long / short)
        im = im.resize((size, new_long) if w <= h else (new_long, size), Image.BICUBIC)
        w, h = im.size
        top, left = (h - size) // 2, (w - size) // 2
        a = np.asarray(im, np.float32)[top:top + size, left:left + size] / 255.0
        a = (a - np.array(CLIP_MEAN, np.float32)) / np.array(CLIP_STD, np.float32)
        out.append(torch.from_numpy(a).permute(2, 0, 1))
    return torch.stack(out)


def load_clip_vision(path: str | Path, device: torch.device, dtype: torch.dtype
                     ) -> CLIPVisionModel:
    """A transformers CLIPVisionModelWithProjection: a folder (config.json + weights) or one
    .safetensors/.bin file; strict."""
    from ..checkpoints.load import open_file
    path = Path(path)
    hf = None
    if path.is_dir():
        if (path / "config.json").is_file():
            hf = json.loads((path / "config.json").read_text())
        files = [path / n for n in ("model.safetensors", "pytorch_model.bin")
                 if (path / n).is_file()]
        if not files:
            raise ModelFileError(f"{path}: no model.safetensors or pytorch_model.bin")
        path = files[0]
    elif (path.parent / "config.json").is_file():
        hf = json.loads((path.parent / "config.json").read_text())
    src = open_file(path)
    sd = {k: src.get(k) for k in src.shapes
          if not k.endswith("position_ids")}  # a buffer some transformers versions save
    cfg = CLIPVisionConfig.detect({k: tuple(v.shape) for k, v in sd.items()}, hf)
    model = CLIPVisionModel(cfg)
    _load_strict(model, sd, str(path))
    return model.to(device, dtype).eval()


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], name: str) -> None:
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or bad:
        raise ModelFileError(f"{name}: missing keys {missing[:8]}, unexpected keys "
                             f"{unexpected[:8]}, shape mismatches {bad[:8]}")
    model.load_state_dict(sd, strict=True)
