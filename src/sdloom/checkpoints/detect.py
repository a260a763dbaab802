"""Which Stable Diffusion family a checkpoint is, from key names and tensor shapes only.

Never from file names. Returns a full ModelConfig (a preset when the shapes are a preset's),
or raises DetectionError naming the key that is missing.
"""
from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

from ..config import PRESETS, ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import SdloomError

UNET = "model.diffusion_model."
VAE = "first_stage_model."

Shapes = Mapping[str, Sequence[int]]


class DetectionError(SdloomError):
    """The checkpoint is not a (complete) Stable Diffusion model we know."""


def _need(shapes: Shapes, key: str, what: str) -> Sequence[int]:
    if key not in shapes:
        raise DetectionError(f"not a complete {what}: missing tensor {key!r}")
    return tuple(shapes[key])


def _indices(shapes: Shapes, prefix: str) -> list[int]:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in shapes if (m := pat.match(k))})


def detect_unet(shapes: Shapes, prefix: str = UNET) -> UNetConfig:
    """UNetConfig from the shapes under `prefix` (LDM names)."""
    what = "Stable Diffusion U-Net"
    mc, in_ch = _need(shapes, prefix + "input_blocks.0.0.weight", what)[:2]
    out_ch = _need(shapes, prefix + "out.2.weight", what)[0]
    ted = _need(shapes, prefix + "time_embed.0.weight", what)[0]
    blocks = _indices(shapes, prefix + "input_blocks.")
    downs = [i for i in blocks if prefix + f"input_blocks.{i}.0.op.weight" in shapes]
    nrb = (downs[0] - 1) if downs else len(blocks) - 1
    levels = len(downs) + 1
    mult, depth = [], []
    for lv in range(levels):
        ob = 1 + lv * (nrb + 1)
        w = _need(shapes, prefix + f"input_blocks.{ob}.0.out_layers.3.weight", what)
        mult.append(w[0] // mc)
        depth.append(len(_indices(shapes, prefix + f"input_blocks.{ob}.1.transformer_blocks.")))
    mid_depth = len(_indices(shapes, prefix + "middle_block.1.transformer_blocks."))
    ctx_keys = [k for k in shapes if k.startswith(prefix) and k.endswith("attn2.to_k.weight")]
    if not ctx_keys:
        raise DetectionError("U-Net has no cross-attention (attn2.to_k): not a text-to-image model")
    context_dim = tuple(shapes[sorted(ctx_keys)[0]])[1]
    proj = [k for k in shapes if k.startswith(prefix) and k.endswith(".proj_in.weight")]
    use_linear = len(tuple(shapes[sorted(proj)[0]])) == 2
    adm_key = prefix + "label_emb.0.0.weight"
    adm = tuple(shapes[adm_key])[1] if adm_key in shapes else None
    # head layout cannot be read from shapes: SD1 uses 8 heads, SD2 and SDXL 64-wide heads
    heads = dict(num_heads=8, num_head_channels=-1) if not use_linear else dict(num_head_channels=64)
    return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=nrb, transformer_depth=tuple(depth),
                      transformer_depth_middle=mid_depth, context_dim=context_dim,
                      use_linear_in_transformer=use_linear, adm_in_channels=adm,
                      time_embed_mult=ted // mc, **heads)


def detect_vae(shapes: Shapes, prefix: str = VAE, sdxl: bool = False) -> VAEConfig:
    """VAEConfig from LDM-named shapes under `prefix`."""
    what = "VAE (AutoencoderKL)"
    ch, in_ch = _need(shapes, prefix + "encoder.conv_in.weight", what)[:2]
    levels = _indices(shapes, prefix + "encoder.down.")
    if not levels:
        raise DetectionError(f"not a complete {what}: no {prefix}encoder.down.* blocks")
    mult = tuple(_need(shapes, prefix + f"encoder.down.{i}.block.0.conv2.weight", what)[0] // ch
                 for i in levels)
    nrb = len(_indices(shapes, prefix + "encoder.down.0.block."))
    z = _need(shapes, prefix + "decoder.conv_in.weight", what)[1]
    embed = _need(shapes, prefix + "post_quant_conv.weight", what)[1]
    out_ch = _need(shapes, prefix + "decoder.conv_out.weight", what)[0]
    return VAEConfig(in_channels=in_ch, out_ch=out_ch, ch=ch, ch_mult=mult, num_res_blocks=nrb,
                     z_channels=z, embed_dim=embed, scale_factor=0.13025 if sdxl else 0.18215)


def detect_text_encoder(shapes: Shapes, prefix: str) -> TextEncoderConfig | None:
    """A text encoder under `prefix` in either layout, or None if there is none."""
    hf = prefix + "transformer.text_model."
    oc = prefix + "model."
    if hf + "embeddings.token_embedding.weight" in shapes:
        vocab, width = tuple(shapes[hf + "embeddings.token_embedding.weight"])
        pos = tuple(shapes[hf + "embeddings.position_embedding.weight"])[0]
        layers = len(_indices(shapes, hf + "encoder.layers."))
        proj_key = prefix + "transformer.text_projection.weight"
        proj = tuple(shapes[proj_key])[0] if proj_key in shapes else None
        return TextEncoderConfig(layout="hf", vocab_size=vocab, max_positions=pos, width=width,
                                 layers=layers, heads=max(1, width // 64), act="quick_gelu",
                                 projection_dim=proj, pad_token=49407)
    if oc + "token_embedding.weight" in shapes:
        vocab, width = tuple(shapes[oc + "token_embedding.weight"])
        pos = tuple(shapes[oc + "positional_embedding"])[0]
        layers = len(_indices(shapes, oc + "transformer.resblocks."))
        proj_key = oc + "text_projection"
        proj = tuple(shapes[proj_key])[1] if proj_key in shapes else None
        return TextEncoderConfig(layout="openclip", vocab_size=vocab, max_positions=pos,
                                 width=width, layers=layers, heads=max(1, width // 64), act="gelu",
                                 projection_dim=proj, hidden_layer=-2, pad_token=0)
    return None


def _match_preset(cfg: ModelConfig) -> ModelConfig:
    for name, p in PRESETS.items():
        if (p.unet, p.vae, p.text_encoders, p.family) == (cfg.unet, cfg.vae, cfg.text_encoders,
                                                          cfg.family):
            return cfg.replace(name=name, default_size=p.default_size, prediction=cfg.prediction)
    return cfg


def detect(shapes: Shapes) -> ModelConfig:
    """The ModelConfig of a single-file checkpoint (LDM/SGM key layout)."""
    if not any(k.startswith(UNET) for k in shapes):
        hint = ""
        if any(k.startswith(("encoder.", "decoder.")) for k in shapes):
            hint = " (it looks like a VAE alone: pass it as --vae)"
        elif any(k.startswith("lora_") for k in shapes):
            hint = " (it looks like a LoRA: pass it as --lora)"
        raise DetectionError(f"not a Stable Diffusion checkpoint: no U-Net tensors "
                             f"({UNET}*){hint}")
    unet = detect_unet(shapes)
    sdxl = unet.adm_in_channels is not None
    vae = detect_vae(shapes, sdxl=sdxl)
    if sdxl:
        encs = []
        for i in _indices(shapes, "conditioner.embedders."):
            te = detect_text_encoder(shapes, f"conditioner.embedders.{i}.")
            if te is not None:
                encs.append(te)
        if not encs:
            raise DetectionError("SDXL checkpoint without text encoders: missing "
                                 "conditioner.embedders.*")
        # SDXL reads penultimate hidden states without the final norm; the OpenCLIP one pools
        encs = [dataclasses.replace(t, hidden_layer=-2, final_norm_on_hidden=False,
                                    pooled=t.layout == "openclip") for t in encs]
        family = "sdxl" if len(encs) == 2 else "sdxl-refiner"
        cfg = ModelConfig(family, unet, vae, tuple(encs), default_size=1024)
    else:
        te = detect_text_encoder(shapes, "cond_stage_model.")
        if te is None:
            raise DetectionError("checkpoint has no text encoder: missing "
                                 "cond_stage_model.transformer.text_model.* (CLIP, SD1) or "
                                 "cond_stage_model.model.* (OpenCLIP, SD2)")
        if te.layout == "openclip":
            # SD2 uses the penultimate layer through ln_final; 768-v models predict v,
            # the inpainting model predicts eps
            pred = "eps" if unet.in_channels != vae.embed_dim else "v"
            cfg = ModelConfig("sd2", unet, vae, (te,), prediction=pred, default_size=768)
        else:
            cfg = ModelConfig("sd1", unet, vae, (te,))
    if "v_pred" in shapes:  # some SD2 trainers mark v-prediction with a marker tensor
        cfg = cfg.replace(prediction="v")
    return _match_preset(cfg)
