"""IP-Adapter (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter"): a CLIP
image embedding projected to a few context tokens, which every cross-attention also attends to
through its own key/value projections; the result is added, weighted, to the text attention.

File layout (the original `ip_adapter.bin` / `.safetensors`): `image_proj.{proj,norm}` (plain,
4 tokens from the image embedding) or `image_proj.{latents,proj_in,layers,proj_out,norm_out}`
(plus: a perceiver resampler over the vision tower's penultimate hidden states, 16 tokens;
full-face: `image_proj.proj.{0,2,3}`, an MLP over every penultimate hidden state),
and `ip_adapter.{1,3,…}.to_{k,v}_ip`, numbered in diffusers' attention-processor order (all
attn1/attn2 of the down blocks, then up, then mid; attn2 take the odd numbers).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from ..errors import ModelFileError, SdloomError
from .attention import CrossAttention, SpatialTransformer


class ImageProjection(nn.Module):
    """Plain IP-Adapter: image embedding [N, D] → `tokens` context tokens [N, T, C]."""

    def __init__(self, embed_dim: int, context_dim: int, tokens: int):
        super().__init__()
        self.tokens = tokens
        self.proj = nn.Linear(embed_dim, tokens * context_dim)
        self.norm = nn.LayerNorm(context_dim)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class FullProjection(nn.Module):
    """Full-face IP-Adapter: every patch of the penultimate hidden states [N, L, E] → a token
    [N, L, C] through Linear, GELU, Linear, LayerNorm (`proj.0`, `proj.2`, `proj.3`)."""

    def __init__(self, embed_dim: int, context_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.GELU(),
                                  nn.Linear(embed_dim, context_dim), nn.LayerNorm(context_dim))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.proj(features)


class PerceiverAttention(nn.Module):
    """Latent queries attend to [image features; latents] (the original's to_kv is one
    matrix: keys, then values)."""
    HEAD = 64  # head width of every published Resampler (diffusers reads heads as width / 64)

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.heads = inner // self.HEAD
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        b, h = latents.shape[0], self.heads
        q, k, v = (t.reshape(b, -1, h, self.HEAD).transpose(1, 2)
                   for t in (self.to_q(latents), k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(b, -1, h * self.HEAD))


class Resampler(nn.Module):
    """IP-Adapter plus: learned latent queries refined by `depth` perceiver layers over the
    projected image features [N, L, E] → [N, queries, C]."""

    def __init__(self, embed_dim: int, dim: int, inner: int, context_dim: int, queries: int,
                 depth: int, ff_inner: int):
        super().__init__()
        self.latents = nn.Parameter(torch.zeros(1, queries, dim))
        self.proj_in = nn.Linear(embed_dim, dim)
        self.proj_out = nn.Linear(dim, context_dim)
        self.norm_out = nn.LayerNorm(context_dim)
        self.layers = nn.ModuleList(nn.ModuleList([
            PerceiverAttention(dim, inner),
            nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, ff_inner, bias=False), nn.GELU(),
                          nn.Linear(ff_inner, dim, bias=False))]) for _ in range(depth))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        latents = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class IPKeyValue(nn.Module):
    def __init__(self, context_dim: int, inner: int):
        super().__init__()
        self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
        self.to_v_ip = nn.Linear(context_dim, inner, bias=False)


class IPAdapter(nn.Module):
    """The adapter's weights: `image_proj` (ImageProjection, or Resampler for plus) and one
    IPKeyValue per cross-attention."""

    def __init__(self, image_proj: nn.Module, context_dim: int, inner: dict[int, int]):
        super().__init__()
        self.image_proj = image_proj
        self.context_dim = context_dim
        # plus and full-face read the penultimate hidden states, not the image embedding
        self.plus = isinstance(image_proj, (Resampler, FullProjection))
        self.ip_adapter = nn.ModuleDict({str(i): IPKeyValue(context_dim, n)
                                         for i, n in sorted(inner.items())})

    @classmethod
    def from_state_dict(cls, sd: dict[str, torch.Tensor], name: str) -> IPAdapter:
        if "image_proj.latents" in sd:
            need = ("image_proj.proj_in.weight", "image_proj.proj_out.weight",
                    "image_proj.layers.0.0.to_q.weight", "image_proj.layers.0.1.1.weight")
            if any(k not in sd for k in need):
                raise ModelFileError(f"{name}: an IP-Adapter plus file lacks "
                                     f"{[k for k in need if k not in sd][:2]}")
            _, queries, dim = sd["image_proj.latents"].shape
            depth = 1 + max(int(k.split(".")[2]) for k in sd
                            if k.startswith("image_proj.layers."))
            context = sd["image_proj.proj_out.weight"].shape[0]
            inner = sd["image_proj.layers.0.0.to_q.weight"].shape[0]
            if inner % PerceiverAttention.HEAD:
                raise ModelFileError(f"{name}: resampler attention width {inner} is not a "
                                     f"multiple of {PerceiverAttention.HEAD}")
            proj = Resampler(sd["image_proj.proj_in.weight"].shape[1], dim, inner, context,
                             queries, depth, sd["image_proj.layers.0.1.1.weight"].shape[0])
        elif "image_proj.proj.3.weight" in sd and "image_proj.proj.0.weight" in sd:
            context = sd["image_proj.proj.3.weight"].shape[0]
            proj = FullProjection(sd["image_proj.proj.0.weight"].shape[1], context)
        elif "image_proj.proj.weight" in sd and "image_proj.norm.weight" in sd:
            out, embed = sd["image_proj.proj.weight"].shape
            context = sd["image_proj.norm.weight"].shape[0]
            proj = ImageProjection(embed, context, out // context)
        else:
            raise ModelFileError(f"{name}: not an IP-Adapter (expected image_proj.proj/norm, "
                                 "image_proj.latents for plus or image_proj.proj.0-3 for "
                                 "full-face; FaceID and others are not supported)")
        inner = {int(k.split(".")[1]): v.shape[0] for k, v in sd.items()
                 if k.startswith("ip_adapter.") and k.endswith(".to_k_ip.weight")}
        model = cls(proj, context, inner)
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        bad = [k for k in own if k in sd and sd[k].shape != own[k].shape]
        if missing or unexpected or bad:
            raise ModelFileError(f"{name}: missing keys {missing[:8]}, unexpected keys "
                                 f"{unexpected[:8]}, shape mismatches {bad[:8]}")
        model.load_state_dict(sd, strict=True)
        return model


def cross_attentions(unet: nn.Module) -> dict[int, CrossAttention]:
    """The U-Net's attn2 modules by diffusers processor index: input blocks, output blocks,
    then the middle block (diffusers' down, up, mid); attn1 takes the even numbers."""
    blocks = [*unet.input_blocks, *unet.output_blocks, unet.middle_block]
    tbs = [tb for b in blocks for m in b if isinstance(m, SpatialTransformer)
           for tb in m.transformer_blocks]
    return {2 * j + 1: tb.attn2 for j, tb in enumerate(tbs)}


def load_ip_adapter(path: str | Path, device: torch.device, dtype: torch.dtype) -> IPAdapter:
    """An IP-Adapter file: .safetensors (flat keys) or .bin/.pth ({"image_proj": …,
    "ip_adapter": …}, read weights_only)."""
    from ..checkpoints.load import open_file
    from ..io import load_torch_weights
    path = Path(path)
    if path.suffix == ".safetensors":
        src = open_file(path)
        sd = {k: src.get(k) for k in src.shapes}
    elif path.is_file():
        raw = load_torch_weights(path)
        if not isinstance(raw, dict):
            raise ModelFileError(f"{path.name}: not an IP-Adapter state dict")
        sd = {}
        for k, v in raw.items():
            if isinstance(v, dict):
                sd.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            elif isinstance(v, torch.Tensor):
                sd[k] = v
    else:
        raise ModelFileError(f"no such IP-Adapter file: {path}")
    return IPAdapter.from_state_dict(sd, path.name).to(device, dtype).eval()


@dataclass
class IPAdapterUnit:
    """One IP-Adapter for generate(): its file, the CLIP vision model it was trained with, the
    reference images (their tokens concatenated, as diffusers does, or their embeddings
    averaged) and a weight active between two fractions of the pass's steps."""
    model: str
    image_encoder: str
    images: list[Image.Image] = field(default_factory=list)
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0
    combine: str = "concat"  # or "average"
    label: str = ""  # "module|model [hash]" when it came as a ControlNet-extension unit

    def check(self) -> None:
        if not self.images:
            raise SdloomError("an IP-Adapter needs at least one reference image")
        if not 0.0 <= self.guidance_start <= self.guidance_end <= 1.0:
            raise SdloomError("IP-Adapter start/end must satisfy 0 ≤ start ≤ end ≤ 1")
        if self.combine not in ("concat", "average"):
            raise SdloomError(f"IP-Adapter combine must be concat or average, "
                              f"not {self.combine!r}")


@dataclass
class ActiveIPAdapter:
    """One unit ready to run: (cond tokens, uncond tokens) [1, T, C] and its rules."""
    adapter: IPAdapter
    cond: torch.Tensor
    uncond: torch.Tensor
    weight: float = 1.0
    guidance_start: float = 0.0
    guidance_end: float = 1.0


@torch.no_grad()
def encode_unit(unit: IPAdapterUnit, adapter: IPAdapter, encoder: nn.Module) -> ActiveIPAdapter:
    """Images → tokens. Plain: the image embeds, uncond from zero embeds; plus: the vision
    tower's penultimate hidden states, uncond from those of an all-zero (normalised) image —
    as the original IP-Adapter and diffusers do."""
    from .clip_vision import preprocess
    p = next(encoder.parameters())
    px = preprocess(unit.images, encoder.config.image_size).to(p.device, p.dtype)
    dtype = next(adapter.parameters()).dtype
    if adapter.plus:
        feats = encoder(px)[1][-2]
        blank = encoder(torch.zeros_like(px[:1]))[1][-2].expand_as(feats)
    else:
        feats = encoder(px)[0]
        blank = torch.zeros_like(feats)
    if unit.combine == "average":
        feats, blank = feats.mean(0, keepdim=True), blank[:1]
    cond = adapter.image_proj(feats.to(dtype)).reshape(1, -1, adapter.context_dim)
    uncond = adapter.image_proj(blank.to(dtype)).reshape(cond.shape)
    return ActiveIPAdapter(adapter, cond, uncond, unit.weight, unit.guidance_start,
                           unit.guidance_end)


def check_fits(adapter: IPAdapter, unet: nn.Module, name: str) -> None:
    """Refuse an adapter made for another U-Net (its attention count or widths differ)."""
    attns = cross_attentions(unet)
    ctx = unet.config.context_dim
    own = adapter.context_dim
    idx = {int(i) for i in adapter.ip_adapter}
    if own != ctx or idx != set(attns) or any(
            adapter.ip_adapter[str(i)].to_k_ip.weight.shape[0] != a.to_q.weight.shape[0]
            for i, a in attns.items()):
        raise SdloomError(f"IP-Adapter {name} does not fit this U-Net (context {own} vs "
                          f"{ctx}, {len(idx)} vs {len(attns)} cross-attentions)")


class IPAdaptedModel(nn.Module):
    """A denoiser model (UNetAdapter, ControlledUNet) whose U-Net's cross-attentions also see
    the image tokens during each call: cond rows the image's, uncond rows (cond_mark 0) the
    zero embedding's. `fraction()` gives A1111's step fraction for start/end."""

    def __init__(self, inner: nn.Module, unet: nn.Module, units: Sequence[ActiveIPAdapter],
                 fraction, pass_mark: bool):
        super().__init__()
        self.inner, self.units, self.fraction, self.pass_mark = inner, list(units), fraction, \
            pass_mark
        self.attns = cross_attentions(unet)

    def forward(self, x, t, context, cond_mark=None, **kw):
        if self.pass_mark:
            kw["cond_mark"] = cond_mark
        frac = self.fraction()
        live = [u for u in self.units
                if u.weight != 0 and u.guidance_start <= frac <= u.guidance_end]
        if not live:
            return self.inner(x, t, context, **kw)
        mark = (torch.ones(x.shape[0]) if cond_mark is None else cond_mark)
        mark = mark.to(x.device).view(-1, 1, 1) > 0.5
        tokens = [torch.where(mark, u.cond.to(x.device), u.uncond.to(x.device)) for u in live]
        try:
            for i, attn in self.attns.items():
                attn.image_kv = [(u.adapter.ip_adapter[str(i)].to_k_ip(tok),
                                  u.adapter.ip_adapter[str(i)].to_v_ip(tok), u.weight)
                                 for u, tok in zip(live, tokens)]
            return self.inner(x, t, context, **kw)
        finally:
            for attn in self.attns.values():
                attn.image_kv = None
