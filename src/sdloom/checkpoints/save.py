"""Writing models: single-file safetensors (config JSON in metadata) and diffusers folders.

All files are written atomically: a temp file in the same folder, then a rename.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import SdloomError
from ..io import atomic_path
from .keymaps.clip import clip_openclip_to_hf
from .keymaps.unet import unet_ldm_to_diffusers
from .keymaps.vae import vae_ldm_to_diffusers
from .load import CONFIG_KEY, IGNORED, TensorSource, open_model_source


def _atomic(path: Path, write) -> None:
    """Run `write(tmp)` on a temp file beside `path`, then rename it into place."""
    with atomic_path(path) as tmp:
        write(str(tmp))


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                     metadata: dict[str, str] | None = None) -> None:
    """safetensors file, atomically; shared storage is cloned (safetensors refuses aliases)."""
    from safetensors.torch import save_file
    seen: set[int] = set()
    out = {}
    for k, v in tensors.items():
        v = v.detach().to("cpu").contiguous()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen and v.numel():
            v = v.clone()
        seen.add(ptr)
        out[k] = v
    _atomic(Path(path), lambda tmp: save_file(out, tmp, metadata=metadata or {}))


def save_model(model: torch.nn.Module, config: ModelConfig, path: str | Path,
               dtype: torch.dtype | None = None, extra_metadata: dict[str, str] | None = None
               ) -> None:
    """Single-file checkpoint in the original SD key layout, with our config in the metadata."""
    sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
          for k, v in model.state_dict().items()}
    meta = {CONFIG_KEY: config.to_json(), **(extra_metadata or {})}
    save_safetensors(sd, path, meta)


def _unet_json(c: UNetConfig) -> dict:
    boc = [c.model_channels * m for m in c.channel_mult]
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
                            else "UNetMidBlock2D"), "sample_size": 64}
    if c.adm_in_channels is not None:
        d.update(addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=c.adm_in_channels)
    return d


def _vae_json(c: VAEConfig) -> dict:
    n = len(c.ch_mult)
    return {"_class_name": "AutoencoderKL", "in_channels": c.in_channels,
            "out_channels": c.out_ch, "block_out_channels": [c.ch * m for m in c.ch_mult],
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "layers_per_block": c.num_res_blocks,
            "latent_channels": c.z_channels, "norm_num_groups": c.num_groups,
            "scaling_factor": c.scale_factor, "shift_factor": c.shift_factor or None}


def _text_json(c: TextEncoderConfig, layers: int) -> dict:
    arch = "CLIPTextModelWithProjection" if c.projection_dim and c.pooled else "CLIPTextModel"
    return {"architectures": [arch], "model_type": "clip_text_model", "hidden_size": c.width,
            "num_hidden_layers": layers, "num_attention_heads": c.heads,
            "intermediate_size": c.width * c.mlp_ratio, "hidden_act": c.act,
            "max_position_embeddings": c.max_positions, "vocab_size": c.vocab_size,
            "projection_dim": c.projection_dim or c.width, "bos_token_id": 49406,
            "eos_token_id": 49407, "pad_token_id": c.pad_token, "layer_norm_eps": 1e-5}


def save_diffusers(cfg: ModelConfig, src: TensorSource, folder: str | Path) -> None:
    """A diffusers pipeline folder (unet/, vae/, text_encoder[_2]/, scheduler/)."""
    folder = Path(folder)
    take = lambda p: {k[len(p):]: src.get(k) for k in src.shapes if k.startswith(p)}  # noqa: E731

    def write(sub: str, name: str, sd: dict, config: dict) -> None:
        save_safetensors(sd, folder / sub / name)
        _atomic(folder / sub / "config.json",
                lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2)))

    write("unet", "diffusion_pytorch_model.safetensors",
          unet_ldm_to_diffusers(take("model.diffusion_model."), cfg.unet), _unet_json(cfg.unet))
    write("vae", "diffusion_pytorch_model.safetensors",
          vae_ldm_to_diffusers(take("first_stage_model.")), _vae_json(cfg.vae))
    prefixes = ([f"conditioner.embedders.{i}." for i in range(len(cfg.text_encoders))]
                if cfg.is_sdxl else ["cond_stage_model."])
    names = (["text_encoder_2"] if cfg.family == "sdxl-refiner"
             else ["text_encoder", "text_encoder_2"][:len(prefixes)])
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
        write(name, "model.safetensors", sd, _text_json(te, layers))
    sched = {"_class_name": "EulerDiscreteScheduler", "beta_start": cfg.linear_start,
             "beta_end": cfg.linear_end, "beta_schedule": "scaled_linear",
             "num_train_timesteps": cfg.num_timesteps,
             "prediction_type": "v_prediction" if cfg.prediction == "v" else "epsilon"}
    _atomic(folder / "scheduler" / "scheduler_config.json",
            lambda tmp: Path(tmp).write_text(json.dumps(sched, indent=2)))
    index = {"_class_name": "StableDiffusionXLPipeline" if cfg.is_sdxl
             else "StableDiffusionPipeline", "sdloom_config": json.loads(cfg.to_json())}
    _atomic(folder / "model_index.json",
            lambda tmp: Path(tmp).write_text(json.dumps(index, indent=2)))


def convert(src_path: str | Path, dst_path: str | Path) -> ModelConfig:
    """diffusers folder ⇄ single-file .safetensors; .ckpt → .safetensors. Tensors kept as they are."""
    dst = Path(dst_path)
    cfg, src = open_model_source(src_path)
    if dst.suffix == ".safetensors":
        keep = {k: src.get(k) for k in src.shapes}
        save_safetensors(keep, dst, {CONFIG_KEY: cfg.to_json()})
    elif dst.suffix == "":
        if dst.exists() and any(dst.iterdir()):
            raise SdloomError(f"{dst} exists and is not empty: will not overwrite")
        clean = TensorSource({k: s for k, s in src.shapes.items() if not IGNORED.match(k)},
                             src.get, src.metadata, src.path)
        save_diffusers(cfg, clean, dst)
    else:
        raise SdloomError(f"{dst}: give a .safetensors file or a folder name (diffusers layout)")
    return cfg

