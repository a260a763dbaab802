"""SD1/SD2/SDXL (+ refiner, inpaint, the embedded model) from key names and tensor shapes only.

Never from file names. Returns a full ModelConfig (a preset when the shapes are a preset's),
or raises DetectionError naming the key that is missing.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from .sd_presets import PRESETS
from .base import DetectionError, Shapes, indices as _indices, need as _need, short_repr as _r

UNET = "model.diffusion_model."
VAE = "first_stage_model."


# What shapes cannot tell, and what detection assumes instead:
# - GroupNorm groups: a GroupNorm weight is [C] whatever the group count. Every published SD
#   U-Net and VAE uses 32 groups; a custom model whose widths are not all divisible by 32 gets the
#   largest power of two ≤ 32 that divides them all (so that it builds).
# - Attention heads: q/k/v weights are [C, C] whatever the split. Published U-Nets follow two
#   conventions: SD1 (conv proj_in) has 8 heads at every level; SD2 and SDXL (linear proj_in)
#   have 64-wide heads. CLIP text encoders (CLIP-L, OpenCLIP H and bigG) all have 64-wide heads.
# - Prediction type, VAE scale/shift, text hidden layer and pad token: per family convention.
# A preset whose shape-readable fields equal the detected ones supplies all of these exactly
# (`_match_preset`). That is how the embedded model is recognised without its metadata: its
# shapes (48-channel 3-level U-Net, 96-wide 4-layer CLIP, 32-channel VAE) are those of no
# published model, and its preset holds its 16 groups, 4 U-Net heads, 2 text heads, v-prediction
# and VAE scale.
UNET_NOT_IN_SHAPES = ("num_heads", "num_head_channels", "num_groups")
VAE_NOT_IN_SHAPES = ("num_groups", "scale_factor", "shift_factor", "latent_rgb")
TEXT_NOT_IN_SHAPES = ("heads", "act", "hidden_layer", "final_norm_on_hidden", "pad_token",
                      "pooled")


def _groups(widths: Sequence[int]) -> int:
    """32, or the largest power of two below it that divides every normalised width."""
    g = 32
    while g > 1 and any(w % g for w in widths):
        g //= 2
    return g


def _unet_heads(widths: Sequence[int], use_linear: bool) -> dict:
    """The head convention of the U-Net family (see above), if it divides the widths."""
    if use_linear and all(w % 64 == 0 for w in widths):
        return dict(num_head_channels=64)  # num_heads unused
    if all(w % 8 == 0 for w in widths):
        return dict(num_heads=8, num_head_channels=-1)
    return dict(num_heads=1, num_head_channels=-1)


def detect_unet(shapes: Shapes, prefix: str = UNET) -> UNetConfig:
    """UNetConfig from the shapes under `prefix` (LDM names)."""
    what = "Stable Diffusion U-Net"
    mc, in_ch = _need(shapes, prefix + "input_blocks.0.0.weight", what, 4)[:2]
    out_ch = _need(shapes, prefix + "out.2.weight", what, 4)[0]
    ted = _need(shapes, prefix + "time_embed.0.weight", what, 2)[0]
    blocks = _indices(shapes, prefix + "input_blocks.")
    downs = [i for i in blocks if prefix + f"input_blocks.{i}.0.op.weight" in shapes]
    nrb = (downs[0] - 1) if downs else len(blocks) - 1
    if nrb < 1:
        raise DetectionError(f"not a {what}: no residual block before the first downsampler")
    levels = len(downs) + 1
    mult, depth, attn_widths = [], [], []
    for lv in range(levels):
        ob = 1 + lv * (nrb + 1)
        w = _need(shapes, prefix + f"input_blocks.{ob}.0.out_layers.3.weight", what, 4)
        mult.append(w[0] // mc)
        depth.append(len(_indices(shapes, prefix + f"input_blocks.{ob}.1.transformer_blocks.")))
        if depth[-1]:
            attn_widths.append(w[0])
    mid_depth = len(_indices(shapes, prefix + "middle_block.1.transformer_blocks."))
    ctx_keys = [k for k in shapes if k.startswith(prefix) and k.endswith("attn2.to_k.weight")]
    if not ctx_keys:
        raise DetectionError("U-Net has no cross-attention (attn2.to_k): not a text-to-image model")
    context_dim = _need(shapes, sorted(ctx_keys)[0], what, 2)[1]
    proj = sorted(k for k in shapes if k.startswith(prefix) and k.endswith(".proj_in.weight"))
    use_linear = bool(proj) and len(tuple(shapes[proj[0]])) == 2
    adm_key = prefix + "label_emb.0.0.weight"
    adm = _need(shapes, adm_key, what, 2)[1] if adm_key in shapes else None
    widths = [mc * m for m in mult]
    return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=nrb, transformer_depth=tuple(depth),
                      transformer_depth_middle=mid_depth, context_dim=context_dim,
                      use_linear_in_transformer=use_linear, adm_in_channels=adm,
                      time_embed_mult=ted // mc, num_groups=_groups(widths),
                      **_unet_heads(attn_widths or widths, use_linear))


def detect_vae(shapes: Shapes, prefix: str = VAE, sdxl: bool = False) -> VAEConfig:
    """VAEConfig from LDM-named shapes under `prefix`."""
    what = "VAE (AutoencoderKL)"
    ch, in_ch = _need(shapes, prefix + "encoder.conv_in.weight", what, 4)[:2]
    levels = _indices(shapes, prefix + "encoder.down.")
    if not levels:
        raise DetectionError(f"not a complete {what}: no {prefix}encoder.down.* blocks")
    mult = tuple(_need(shapes, prefix + f"encoder.down.{i}.block.0.conv2.weight", what, 4)[0]
                 // ch for i in levels)
    nrb = len(_indices(shapes, prefix + "encoder.down.0.block."))
    z = _need(shapes, prefix + "decoder.conv_in.weight", what, 4)[1]
    quant = prefix + "post_quant_conv.weight" in shapes  # SD3/Flux VAEs have no quant convs
    embed = _need(shapes, prefix + "post_quant_conv.weight", what, 4)[1] if quant else z
    out_ch = _need(shapes, prefix + "decoder.conv_out.weight", what, 4)[0]
    return VAEConfig(in_channels=in_ch, out_ch=out_ch, ch=ch, ch_mult=mult, num_res_blocks=nrb,
                     z_channels=z, embed_dim=embed, num_groups=_groups([ch * m for m in mult]),
                     use_quant_conv=quant,
                     scale_factor=0.13025 if sdxl else 0.18215)


def _text_heads(width: int) -> int:
    return width // 64 if width % 64 == 0 else 1  # 64-wide heads (see above)


def detect_text_encoder(shapes: Shapes, prefix: str) -> TextEncoderConfig | None:
    """A text encoder under `prefix` in either layout, or None if there is none."""
    what = "CLIP text encoder"
    hf = prefix + "transformer.text_model."
    oc = prefix + "model."
    if hf + "embeddings.token_embedding.weight" in shapes:
        vocab, width = _need(shapes, hf + "embeddings.token_embedding.weight", what, 2)
        pos = _need(shapes, hf + "embeddings.position_embedding.weight", what, 2)[0]
        layers = len(_indices(shapes, hf + "encoder.layers."))
        hidden = _need(shapes, hf + "encoder.layers.0.mlp.fc1.weight", what, 2)[0]
        proj_key = prefix + "transformer.text_projection.weight"
        proj = _need(shapes, proj_key, what, 2)[0] if proj_key in shapes else None
        return TextEncoderConfig(layout="hf", vocab_size=vocab, max_positions=pos, width=width,
                                 layers=layers, heads=_text_heads(width),
                                 mlp_ratio=hidden // width, act="quick_gelu",
                                 projection_dim=proj, pad_token=49407)
    if oc + "token_embedding.weight" in shapes:
        vocab, width = _need(shapes, oc + "token_embedding.weight", what, 2)
        pos = _need(shapes, oc + "positional_embedding", what, 2)[0]
        layers = len(_indices(shapes, oc + "transformer.resblocks."))
        hidden = _need(shapes, oc + "transformer.resblocks.0.mlp.c_fc.weight", what, 2)[0]
        proj_key = oc + "text_projection"
        proj = _need(shapes, proj_key, what, 2)[1] if proj_key in shapes else None
        return TextEncoderConfig(layout="openclip", vocab_size=vocab, max_positions=pos,
                                 width=width, layers=layers, heads=_text_heads(width),
                                 mlp_ratio=hidden // width, act="gelu", projection_dim=proj,
                                 hidden_layer=-2, pad_token=0)
    return None


def shape_fields(cfg: ModelConfig) -> dict[str, object]:
    """The fields of a config that tensor shapes determine, by dotted name."""
    out: dict[str, object] = {"family": cfg.family}
    parts = [("unet", cfg.unet, UNET_NOT_IN_SHAPES), ("vae", cfg.vae, VAE_NOT_IN_SHAPES)]
    parts += [(f"text_encoders[{i}]", t, TEXT_NOT_IN_SHAPES)
              for i, t in enumerate(cfg.text_encoders)]
    for label, part, skip in parts:
        for f in dataclasses.fields(part):
            if f.name not in skip:
                out[f"{label}.{f.name}"] = getattr(part, f.name)
    return out


def _match_preset(cfg: ModelConfig, v_marker: bool = False) -> ModelConfig:
    """The preset with the same shape-readable fields (all its other fields included)."""
    key = shape_fields(cfg)
    for name, p in PRESETS.items():
        if shape_fields(p) == key:
            return p.replace(prediction="v") if v_marker else p
    return cfg


def detect_structure(shapes: Shapes) -> ModelConfig:
    """The config that the shapes and the family conventions give, before any preset."""
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
            # 768-v was trained at 768×768, base and inpainting models at 512×512
            cfg = ModelConfig("sd2", unet, vae, (te,), prediction=pred,
                              default_size=768 if pred == "v" else 512)
        else:
            cfg = ModelConfig("sd1", unet, vae, (te,))
    if "v_pred" in shapes:  # some SD2 trainers mark v-prediction with a marker tensor
        cfg = cfg.replace(prediction="v")
    return cfg


def detect(shapes: Shapes) -> ModelConfig:
    """The ModelConfig of a single-file checkpoint (LDM/SGM key layout): a preset when the
    shapes are a preset's, else the conventions above."""
    return _match_preset(detect_structure(shapes), v_marker="v_pred" in shapes)


def _divides(label: str, n: object, widths: Sequence[int]) -> list[str]:
    if not isinstance(n, int) or n < 1 or any(w % n for w in widths):
        return [f"{label} = {_r(n)} does not divide the widths {sorted(set(widths))}"]
    return []


def config_problems(cfg: ModelConfig, shapes: Shapes) -> list[str]:
    """Why a config (e.g. from a file's metadata) does not describe these tensors; [] if it does.

    Reads only key names and shapes, so a config that claims huge sizes is refused before
    anything is built: every shape-readable field must equal what the tensors say, and the
    fields that shapes cannot tell must at least fit the widths.
    """
    problems: list[str] = []

    def compare(label: str, want: object, skip: Sequence[str], read) -> None:
        try:
            got = read()
        except DetectionError as e:
            problems.append(f"{label}: {e}")
            return
        if got is None:
            problems.append(f"{label}: no such tensors in the file")
            return
        for f in dataclasses.fields(got):
            a, b = getattr(want, f.name), getattr(got, f.name)
            if f.name not in skip and a != b:
                problems.append(f"{label}.{f.name} is {_r(a)} in the metadata, {_r(b)} in the "
                                "tensors")

    compare("unet", cfg.unet, UNET_NOT_IN_SHAPES, lambda: detect_unet(shapes))
    compare("vae", cfg.vae, VAE_NOT_IN_SHAPES, lambda: detect_vae(shapes))
    rgb = cfg.vae.latent_rgb
    if rgb and (len(rgb) != 3 * (cfg.vae.embed_dim + 1)
                or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in rgb)):
        problems.append(f"vae.latent_rgb must be {3 * (cfg.vae.embed_dim + 1)} finite numbers "
                        "(a row of 3 per latent channel, then the bias)")
    if cfg.is_sdxl:
        found = [i for i in _indices(shapes, "conditioner.embedders.")
                 if detect_text_encoder(shapes, f"conditioner.embedders.{i}.") is not None]
        prefixes = [f"conditioner.embedders.{i}." for i in range(len(cfg.text_encoders))]
        if len(found) != len(cfg.text_encoders):
            problems.append(f"text_encoders: {len(cfg.text_encoders)} in the metadata, "
                            f"{len(found)} in the tensors")
    else:
        prefixes = ["cond_stage_model."]
        if len(cfg.text_encoders) != 1:
            problems.append(f"text_encoders: {len(cfg.text_encoders)} in the metadata, "
                            "SD1/SD2 models have exactly 1")
    for i, (p, te) in enumerate(zip(prefixes, cfg.text_encoders)):
        compare(f"text_encoders[{i}]", te, TEXT_NOT_IN_SHAPES,
                lambda p=p: detect_text_encoder(shapes, p))
    if problems:
        return problems
    # the fields shapes cannot tell: they must at least make a model that builds and runs
    u, v = cfg.unet, cfg.vae
    widths = [u.model_channels * m for m in u.channel_mult]
    problems += _divides("unet.num_groups", u.num_groups, widths)
    problems += _divides("vae.num_groups", v.num_groups, [v.ch * m for m in v.ch_mult])
    attn = [w for w, d in zip(widths, u.transformer_depth) if d] or widths
    if u.num_head_channels != -1:
        problems += _divides("unet.num_head_channels", u.num_head_channels, attn)
    else:
        problems += _divides("unet.num_heads", u.num_heads, attn)
    for i, te in enumerate(cfg.text_encoders):
        problems += _divides(f"text_encoders[{i}].heads", te.heads, [te.width])
        if te.act not in ("quick_gelu", "gelu"):
            problems.append(f"text_encoders[{i}].act = {_r(te.act)} is not quick_gelu or gelu")
        if not isinstance(te.hidden_layer, int) or not -te.layers <= te.hidden_layer <= -1:
            problems.append(f"text_encoders[{i}].hidden_layer = {_r(te.hidden_layer)} is not in "
                            f"-1..-{te.layers}")
    if cfg.family not in ("sd1", "sd2", "sdxl", "sdxl-refiner", "embedded"):
        problems.append(f"family = {_r(cfg.family)} is not one sdloom knows")
    if cfg.prediction not in ("eps", "v"):
        problems.append(f"prediction = {_r(cfg.prediction)} is not eps or v")
    if not isinstance(cfg.default_size, int) or not 64 <= cfg.default_size <= 8192:
        problems.append(f"default_size = {_r(cfg.default_size)} is not in 64..8192")
    return problems
