"""SD1/SD2/SDXL diffusers folders: reading one into our single-file names and config, and
writing one that `DiffusionPipeline.from_pretrained` loads as is.

The layout follows the published SD folders: model_index.json naming every component, one
sub-folder per model (config.json + safetensors), CLIP tokenizer files written from the BPE
vocabulary sdloom reads (`tokenizer.py`), and a scheduler config with the model's betas.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .keymaps.clip import clip_hf_to_openclip, clip_openclip_to_hf, normalize_hf_clip
from .keymaps.unet import (unet_config_from_diffusers, unet_diffusers_to_ldm,
                                        unet_ldm_to_diffusers)
from .keymaps.vae import vae_diffusers_to_ldm, vae_ldm_to_diffusers
from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import ModelFileError
from ..tokenizer import BOS, EOS, get_tokenizer
from .base import ComponentReader, JsonReader, StateDict, indices
from .sd_detect import config_problems

UNET = "model.diffusion_model."
VAE = "first_stage_model."


# ---------------------------------------------------------------- reading

def text_config_from_hf(hc: dict) -> TextEncoderConfig:
    """A TextEncoderConfig from a transformers CLIPTextConfig dict."""
    # OpenCLIP-trained encoders (SD2's H, SDXL's bigG) use exact GELU; OpenAI's CLIP-L quick GELU
    openclip = hc.get("hidden_act", "quick_gelu") == "gelu"
    proj = hc.get("projection_dim") if any(
        "Projection" in a for a in hc.get("architectures") or []) else None
    return TextEncoderConfig(
        layout="openclip" if openclip else "hf", vocab_size=hc.get("vocab_size", 49408),
        max_positions=hc.get("max_position_embeddings", 77), width=hc["hidden_size"],
        layers=hc["num_hidden_layers"], heads=hc["num_attention_heads"],
        mlp_ratio=hc.get("intermediate_size", 4 * hc["hidden_size"]) // hc["hidden_size"],
        act=hc.get("hidden_act", "quick_gelu"), projection_dim=proj,
        pad_token=0 if openclip else 49407)


def vae_config_from_diffusers(vc: dict, sdxl: bool) -> VAEConfig:
    boc = vc["block_out_channels"]
    scale = vc.get("scaling_factor") or (0.13025 if sdxl else 0.18215)
    return VAEConfig(in_channels=vc.get("in_channels", 3), out_ch=vc.get("out_channels", 3),
                     ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc),
                     num_res_blocks=vc.get("layers_per_block", 2),
                     z_channels=vc.get("latent_channels", 4), embed_dim=vc.get("latent_channels", 4),
                     num_groups=vc.get("norm_num_groups", 32), scale_factor=scale,
                     shift_factor=vc.get("shift_factor") or 0.0,
                     use_quant_conv=vc.get("use_quant_conv", True),
                     latent_rgb=tuple(vc.get("sdloom_latent_rgb") or ()))


def mapped(where: str, keymap, *args):
    """A key map's result, its errors prefixed with the component they came from."""
    try:
        return keymap(*args)
    except ModelFileError as e:
        raise ModelFileError(f"{where}: {e}") from None


def check_folder(where: str, problems: list[str]) -> None:
    """One error for a diffusers folder whose config.json files do not describe its weights."""
    if problems:
        raise ModelFileError(f"{where}: its config.json files do not match its weights: "
                             + "; ".join(problems[:3]))


def open_sd_diffusers(name: str, component: ComponentReader, json_of: JsonReader
                      ) -> tuple[ModelConfig, StateDict]:
    """An SD1/SD2/SDXL diffusers folder → (config, state dict in single-file names)."""
    uc = json_of("unet/config.json")
    unet = unet_config_from_diffusers(uc)
    sdxl = unet.adm_in_channels is not None
    vae = vae_config_from_diffusers(json_of("vae/config.json"), sdxl)
    uw = component("unet")
    # the two counts the key map is built from, checked first so that a config claiming
    # thousands of blocks costs nothing (everything else is checked against shapes below)
    for field_, got in (("block_out_channels (levels)", len(indices(uw, "down_blocks."))),
                        ("layers_per_block", len(indices(uw, "down_blocks.0.resnets.")))):
        want = len(unet.channel_mult) if field_.startswith("block") else unet.num_res_blocks
        if want != got:
            raise ModelFileError(f"diffusers folder {name}: unet/config.json "
                                 f"{field_} says {want}, the weights have {got}")
    where = f"diffusers folder {name}"
    sd = {UNET + k: v for k, v in mapped(where + "/unet", unet_diffusers_to_ldm, uw,
                                          unet).items()}
    sd.update({VAE + k: v for k, v in mapped(
        where + "/vae", vae_diffusers_to_ldm, component("vae")).items()})
    encs: list[TextEncoderConfig] = []
    names = [n for n in ("text_encoder", "text_encoder_2") if component.has(n)]
    if not names:
        raise ModelFileError(f"diffusers folder {name} has no text_encoder/")
    for n in names:
        te = text_config_from_hf(json_of(f"{n}/config.json"))
        w = normalize_hf_clip(component(n))
        if sdxl:
            te = dataclasses.replace(te, hidden_layer=-2, final_norm_on_hidden=False,
                                     pooled=te.layout == "openclip")
            prefix = f"conditioner.embedders.{len(encs)}."
        else:
            # diffusers stores SD2's encoder with the last layer removed, so "last + final norm"
            # here is SD2's "penultimate + ln_final"
            prefix = "cond_stage_model."
        if te.layout == "openclip":
            w = {prefix + "model." + k: v for k, v in mapped(
                f"{where}/{n}", clip_hf_to_openclip, w, te.layers).items()}
        else:
            w = {prefix + "transformer." + k: v for k, v in w.items()}
        sd.update(w)
        encs.append(te)
    if sdxl:
        family = "sdxl" if len(encs) == 2 else "sdxl-refiner"
        cfg = ModelConfig(family, unet, vae, tuple(encs), default_size=1024)
    else:
        family = "sd2" if encs[0].layout == "openclip" else "sd1"
        sched = (json_of("scheduler/scheduler_config.json") if component.has("scheduler")
                 else {})
        pred = "v" if sched.get("prediction_type") == "v_prediction" else "eps"
        cfg = ModelConfig(family, unet, vae, tuple(encs), prediction=pred,
                          default_size=8 * uc.get("sample_size", 64))
    check_folder(where, config_problems(cfg, {k: tuple(v.shape) for k, v in sd.items()}))
    return cfg, sd


# ---------------------------------------------------------------- writing


def _unet_json(c: UNetConfig, sample_size: int) -> dict:
    boc = [c.model_channels * m for m in c.channel_mult]
    # diffusers' `attention_head_dim` is the head count for SD1 (fixed heads) and per level
    # for 64-wide heads (SD2/SDXL), as in the published configs
    heads = ([b // c.num_head_channels for b in boc] if c.num_head_channels != -1
             else c.num_heads)
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in c.transformer_depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(c.transformer_depth)]
    # diffusers' mid block takes the last level's depth; a level without attention ignores it
    layers_per_level = [max(1, t) for t in c.transformer_depth]
    if not c.transformer_depth[-1]:
        layers_per_level[-1] = max(1, c.transformer_depth_middle)
    d = {"_class_name": "UNet2DConditionModel", "in_channels": c.in_channels,
         "out_channels": c.out_channels, "block_out_channels": boc,
         "layers_per_block": c.num_res_blocks, "down_block_types": down, "up_block_types": up,
         "cross_attention_dim": c.context_dim, "attention_head_dim": heads,
         "use_linear_projection": c.use_linear_in_transformer, "norm_num_groups": c.num_groups,
         "transformer_layers_per_block": layers_per_level,
         "mid_block_type": ("UNetMidBlock2DCrossAttn" if c.transformer_depth_middle
                            else "UNetMidBlock2D"), "sample_size": sample_size}
    if c.adm_in_channels is not None:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=c.adm_in_channels)
    return d


def _vae_json(c: VAEConfig, sample_size: int) -> dict:
    n = len(c.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels,
            "out_channels": c.out_ch, "block_out_channels": [c.ch * m for m in c.ch_mult],
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": c.num_res_blocks,
            "latent_channels": c.z_channels, "norm_num_groups": c.num_groups,
            "scaling_factor": c.scale_factor, "shift_factor": c.shift_factor or None,
            "use_quant_conv": c.use_quant_conv, "use_post_quant_conv": c.use_quant_conv,
            "sample_size": sample_size,
            # the live preview's fitted factors (diffusers ignores keys it does not know)
            **({"sdloom_latent_rgb": list(c.latent_rgb)} if c.latent_rgb else {})}


def _text_json(c: TextEncoderConfig, layers: int) -> dict:
    arch = "CLIPTextModelWithProjection" if c.projection_dim and c.pooled else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", "hidden_size": c.width,
            "num_hidden_layers": layers, "num_attention_heads": c.heads,
            "intermediate_size": c.width * c.mlp_ratio, "hidden_act": c.act,
            "max_position_embeddings": c.max_positions, "vocab_size": c.vocab_size,
            "projection_dim": c.projection_dim or c.width, "bos_token_id": BOS,
            "eos_token_id": EOS, "pad_token_id": c.pad_token, "layer_norm_eps": 1e-5}


def _scheduler_json(cfg: ModelConfig) -> dict:
    """The scheduler the published folders ship: PNDM for SD1/SD2, Euler for SDXL."""
    d = {"_class_name": "EulerDiscreteScheduler" if cfg.is_sdxl else "PNDMScheduler",
         "beta_start": cfg.linear_start, "beta_end": cfg.linear_end,
         "beta_schedule": "scaled_linear", "num_train_timesteps": cfg.num_timesteps,
         "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon",
         "clip_sample": False, "set_alpha_to_one": False, "skip_prk_steps": True,
         "steps_offset": 1, "trained_betas": None}
    if cfg.is_sdxl:
        d.update(interpolation_type="linear", timestep_spacing="leading",
                 use_karras_sigmas=False, sample_max_value=1.0)
    return d


def _pad_text(te: TextEncoderConfig) -> str:
    """The pad token as text: SD1's CLIP pads with <|endoftext|>, OpenCLIP with "!" (id 0)."""
    tok = get_tokenizer()
    return next(t for t, i in tok.encoder.items() if i == te.pad_token)


def write_clip_tokenizer(folder: Path, te: TextEncoderConfig) -> None:
    """transformers' CLIPTokenizer files from our BPE tables: vocab.json, merges.txt (the
    48894 merges CLIP uses, after a `#version` header), and the special-token configs."""
    tok = get_tokenizer()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(tok.encoder, ensure_ascii=False),
                                       encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(tok.ranks) + "\n",
                                       encoding="utf-8")
    specials = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>", "pad_token": _pad_text(te)}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": te.max_positions,
              "do_lower_case": True, "add_prefix_space": False, "errors": "replace", **specials}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def _pipeline_class(cfg: ModelConfig) -> str:
    if cfg.family == "sdxl-refiner":
        return "StableDiffusionXLImg2ImgPipeline"
    kind = "Inpaint" if cfg.is_inpaint else ""
    return f"StableDiffusionXL{kind}Pipeline" if cfg.is_sdxl else f"StableDiffusion{kind}Pipeline"


def save_sd_diffusers(cfg: ModelConfig, get: Callable[[str], torch.Tensor],
                      keys: Sequence[str], folder: Path,
                      save_tensors: Callable[[StateDict, Path], None]) -> None:
    """A diffusers pipeline folder: model_index.json, unet/, vae/, text_encoder[_2]/,
    tokenizer[_2]/, scheduler/. Writes into `folder` as it is (the caller makes it atomic)."""
    take = lambda p: {k[len(p):]: get(k) for k in keys if k.startswith(p)}  # noqa: E731

    def write(sub: str, name: str, sd: dict, config: dict) -> None:
        save_tensors(sd, folder / sub / name)
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))
    size = cfg.default_size
    write("unet", "diffusion_pytorch_model.safetensors",
          unet_ldm_to_diffusers(take(UNET), cfg.unet),
          _unet_json(cfg.unet, size // cfg.vae.downscale))
    write("vae", "diffusion_pytorch_model.safetensors", vae_ldm_to_diffusers(take(VAE)),
          _vae_json(cfg.vae, size))
    prefixes = ([f"conditioner.embedders.{i}." for i in range(len(cfg.text_encoders))]
                if cfg.is_sdxl else ["cond_stage_model."])
    names = (["text_encoder_2"] if cfg.family == "sdxl-refiner"
             else ["text_encoder", "text_encoder_2"][:len(prefixes)])
    index: dict = {"_class_name": _pipeline_class(cfg),
                   "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"]}
    for name, prefix, te in zip(names, prefixes, cfg.text_encoders):
        if te.layout == "openclip":
            sd = clip_openclip_to_hf(take(prefix + "model."))
            layers = te.layers
            if not cfg.is_sdxl and te.hidden_layer == -2:
                # diffusers' SD2 convention: drop the unused last layer, read the last hidden
                # state (through the final norm) instead of the penultimate one
                layers -= 1
                drop = f"text_model.encoder.layers.{layers}."
                sd = {k: v for k, v in sd.items() if not k.startswith(drop)}
            if not te.pooled:
                sd.pop("text_projection.weight", None)
        else:
            sd, layers = take(prefix + "transformer."), te.layers
        text = _text_json(te, layers)
        write(name, "model.safetensors", sd, text)
        tokenizer = name.replace("text_encoder", "tokenizer")
        write_clip_tokenizer(folder / tokenizer, te)
        index[name] = ["transformers", text["architectures"][0]]
        index[tokenizer] = ["transformers", "CLIPTokenizer"]
    sched = _scheduler_json(cfg)
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched, indent=2))
    index["scheduler"] = ["diffusers", sched["_class_name"]]
    # optional components stay empty: no safety checker, no IP-Adapter image encoder
    index.update(feature_extractor=[None, None], image_encoder=[None, None])
    if cfg.family == "sdxl-refiner":
        index.update(text_encoder=[None, None], tokenizer=[None, None],
                     requires_aesthetics_score=True, force_zeros_for_empty_prompt=False)
    elif cfg.is_sdxl:
        index["force_zeros_for_empty_prompt"] = True
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
