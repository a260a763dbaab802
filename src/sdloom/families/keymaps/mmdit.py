"""diffusers `SD3Transformer2DModel` names ⇄ original SD3 / SD3.5 MMDiT names, from tables.

Three kinds of row: a plain rename; a fused qkv (diffusers keeps to_q/to_k/to_v apart, the
original stores one [3C, C] `qkv`); and a swapped adaLN, for the final layer and the last
block's pre-only text stream, which the original stores as (shift, scale) and diffusers'
`AdaLayerNormContinuous` as (scale, shift). Works on plain dicts without the
`model.diffusion_model.` prefix; keys that match no row pass through unchanged, so a strict load
afterwards names anything unexpected.
"""
from __future__ import annotations

import re

import torch

from ...errors import ModelFileError
from ...models.mmdit import MMDiTConfig

# (diffusers, original) top-level modules
TOP = [("pos_embed.proj", "x_embedder.proj"),
       ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
       ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
       ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0"),
       ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2"),
       ("context_embedder", "context_embedder"),
       ("proj_out", "final_layer.linear")]
# (diffusers, original) modules inside block N: transformer_blocks.N ⇄ joint_blocks.N
BLOCK = [("attn.to_out.0", "x_block.attn.proj"),
         ("attn.to_add_out", "context_block.attn.proj"),
         ("attn.norm_q", "x_block.attn.ln_q"),
         ("attn.norm_k", "x_block.attn.ln_k"),
         ("attn.norm_added_q", "context_block.attn.ln_q"),
         ("attn.norm_added_k", "context_block.attn.ln_k"),
         ("attn2.to_out.0", "x_block.attn2.proj"),
         ("attn2.norm_q", "x_block.attn2.ln_q"),
         ("attn2.norm_k", "x_block.attn2.ln_k"),
         ("norm1.linear", "x_block.adaLN_modulation.1"),
         ("norm1_context.linear", "context_block.adaLN_modulation.1"),
         ("ff.net.0.proj", "x_block.mlp.fc1"),
         ("ff.net.2", "x_block.mlp.fc2"),
         ("ff_context.net.0.proj", "context_block.mlp.fc1"),
         ("ff_context.net.2", "context_block.mlp.fc2")]
# (diffusers q, k, v modules, original fused module) inside block N
FUSED = [(("attn.to_q", "attn.to_k", "attn.to_v"), "x_block.attn.qkv"),
         (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "context_block.attn.qkv"),
         (("attn2.to_q", "attn2.to_k", "attn2.to_v"), "x_block.attn2.qkv")]
PARAMS = ("weight", "bias")


def _depth(sd: dict, block: str) -> int:
    found = {int(m.group(1)) for k in sd if (m := re.match(rf"{block}\.(\d+)\.", k))}
    return max(found) + 1 if found else 0


def _tables(depth: int) -> tuple[dict[str, tuple[str, bool]], list[tuple[tuple[str, ...], str]]]:
    """Full-key tables for `depth` blocks: {diffusers: (original, swapped)}, [(d q,k,v, orig)]."""
    plain: dict[str, tuple[str, bool]] = {"pos_embed.pos_embed": ("pos_embed", False)}
    fused = []
    for d, o in TOP:
        for p in PARAMS:
            plain[f"{d}.{p}"] = (f"{o}.{p}", False)
    for p in PARAMS:
        plain[f"norm_out.linear.{p}"] = (f"final_layer.adaLN_modulation.1.{p}", True)
    for i in range(depth):
        for d, o in BLOCK:
            swap = d == "norm1_context.linear" and i == depth - 1  # pre-only text stream
            for p in PARAMS:
                plain[f"transformer_blocks.{i}.{d}.{p}"] = (f"joint_blocks.{i}.{o}.{p}", swap)
        for ds, o in FUSED:
            for p in PARAMS:
                fused.append((tuple(f"transformer_blocks.{i}.{d}.{p}" for d in ds),
                              f"joint_blocks.{i}.{o}.{p}"))
    return plain, fused


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    """(a, b) → (b, a) along dim 0: shift/scale order between the two layouts."""
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _put(out: dict, key: str, value: torch.Tensor) -> None:
    if key in out:
        raise ModelFileError(f"two MMDiT keys map to {key!r}")
    out[key] = value


def mmdit_diffusers_to_original(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers SD3Transformer2DModel state dict into original MMDiT names."""
    plain, fused = _tables(_depth(sd, "transformer_blocks"))
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    for parts, o in fused:
        present = [k in sd for k in parts]
        if all(present):
            _put(out, o, torch.cat([sd[k] for k in parts], dim=0))
            used.update(parts)
        elif any(present):
            missing = [k for k, here in zip(parts, present) if not here]
            raise ModelFileError(f"MMDiT state dict has part of a q/k/v triple: missing {missing}")
    for k, v in sd.items():
        if k in used:
            continue
        o, swap = plain.get(k, (k, False))
        _put(out, o, swap_halves(v) if swap else v)
    return out


def mmdit_original_to_diffusers(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename an original MMDiT state dict (no prefix) into diffusers names."""
    plain, fused = _tables(_depth(sd, "joint_blocks"))
    back = {o: (d, swap) for d, (o, swap) in plain.items()}
    split = {o: parts for parts, o in fused}
    out: dict[str, torch.Tensor] = {}
    for k, v in sd.items():
        if k in split:
            if v.shape[0] % 3:
                raise ModelFileError(f"MMDiT {k} has {v.shape[0]} rows, not a fused q/k/v")
            for d, part in zip(split[k], v.chunk(3, dim=0)):
                _put(out, d, part)
            continue
        d, swap = back.get(k, (k, False))
        _put(out, d, swap_halves(v) if swap else v)
    return out


def mmdit_config_from_diffusers(cfg: dict) -> MMDiTConfig:
    """Our config from a diffusers SD3Transformer2DModel config (its config.json as a dict)."""
    heads, head_dim = cfg.get("num_attention_heads", 18), cfg.get("attention_head_dim", 64)
    hidden = heads * head_dim
    if cfg.get("caption_projection_dim", 1152) != hidden:
        # the joint attention feeds context_embedder's output into hidden-wide projections
        raise ModelFileError(f"SD3 transformer caption_projection_dim "
                             f"{cfg.get('caption_projection_dim')} differs from its width {hidden}")
    qk_norm = cfg.get("qk_norm")
    if qk_norm not in (None, "rms_norm"):
        raise ModelFileError(f"SD3 transformer qk_norm {qk_norm!r} is not supported "
                             "(only rms_norm, as SD3.5)")
    in_ch = cfg.get("in_channels", 16)
    return MMDiTConfig(
        patch_size=cfg.get("patch_size", 2), in_channels=in_ch,
        out_channels=cfg.get("out_channels") or in_ch, depth=cfg.get("num_layers", 18),
        hidden_size=hidden, num_heads=heads, context_dim=cfg.get("joint_attention_dim", 4096),
        pooled_dim=cfg.get("pooled_projection_dim", 2048),
        pos_embed_max_size=cfg.get("pos_embed_max_size", 96), qk_norm=qk_norm is not None,
        dual_attention_layers=tuple(sorted(cfg.get("dual_attention_layers") or ())))


def mmdit_config_to_diffusers(cfg: MMDiTConfig, sample_size: int = 128) -> dict:
    """The diffusers SD3Transformer2DModel config for our config (sample_size: latent side)."""
    if cfg.mlp_ratio != 4:
        raise ModelFileError(f"diffusers' SD3 transformer has mlp ratio 4, not {cfg.mlp_ratio}")
    return {"sample_size": sample_size, "patch_size": cfg.patch_size,
            "in_channels": cfg.in_channels, "num_layers": cfg.depth,
            "attention_head_dim": cfg.head_dim, "num_attention_heads": cfg.num_heads,
            "joint_attention_dim": cfg.context_dim, "caption_projection_dim": cfg.hidden_size,
            "pooled_projection_dim": cfg.pooled_dim, "out_channels": cfg.out_channels,
            "pos_embed_max_size": cfg.pos_embed_max_size,
            "dual_attention_layers": cfg.dual_attention_layers,
            "qk_norm": "rms_norm" if cfg.qk_norm else None}
