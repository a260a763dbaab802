"""LDSR: latent diffusion super-resolution 4× (Rombach et al. 2022, the `bsr_sr` model A1111
ships as its "LDSR" upscaler: `model.ckpt` + `project.yaml`), and the diffusers
`LDMSuperResolutionPipeline` folder (`unet/`, `vqvae/`, `scheduler/`), as a family of its own.

A VQ-f4 first stage (models/vq.py); a U-Net without text whose input is the noisy latent
concatenated with the low-res image itself in [-1, 1] (the latent has the low-res image's size;
6 channels in, 3 out), LDM's legacy `AttentionBlock`s (32-wide heads) at the lowest level and
in the middle; ε-prediction on LDM-linear betas 0.0015…0.0155; latent scale 1. Sampling is LDM's
DDIM as A1111 runs it (`ldsr_model_arch.py`): 100 steps, eta 1, timesteps 1, 11, …, 991, the
last step to ᾱ_0 (not to 0), the U-Net and the VQ decoder applied in overlapping patches
(`split_input_params`: 128 latent cells, stride 64, border-distance weights). The low-res image
is resized by target/4 first and padded to multiples of 64 (at least 128) with its edge pixels.

Keys: `model.diffusion_model.*` (LDM `UNetModel` names), `first_stage_model.*` (`encoder.*`,
`decoder.*`, `quant_conv`, `quantize.embedding.weight`, `post_quant_conv`).
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, UNetConfig, VAEConfig
from ..errors import ModelFileError, SdloomError
from ..models.unet import UNetModel
from ..models.vq import VQModel
from ..sampling.denoisers import sample
from ..sampling.model_sampling import DiscreteSampling
from ..sampling.schedules import DiscreteSchedule, ddim_uniform
from .base import (ComponentReader, DetectionError, Family, JsonReader, LatentFormat, Shapes,
                   StateDict, indices, need, short_repr)
from .keymaps.unet import unet_diffusers_to_ldm, unet_ldm_to_diffusers
from .keymaps.vae import vae_diffusers_to_ldm, vae_ldm_to_diffusers
from .sd import DiffusionWrapper
from .sd_detect import _groups, detect_vae
from .sd_diffusers import check_folder, mapped

FAMILY = "ldsr"
UNET, VQ = "model.diffusion_model.", "first_stage_model."
EMBED = VQ + "quantize.embedding.weight"
LINEAR_START, LINEAR_END = 0.0015, 0.0155  # bsr_sr project.yaml ("linear": linear in √β)
HEAD_CHANNELS = 32  # project.yaml num_head_channels; shapes cannot tell the head split
STEPS, ETA = 100, 1.0  # A1111's ldsr_steps default; eta fixed to 1 in ldsr_model_arch.py
TILE, STRIDE = 128, 64  # split_input_params ks / stride, in latent cells
PAD = 64  # the low-res image is padded to multiples of this (at least 2 of them)
CLIP_MIN, CLIP_MAX = 0.01, 0.5  # split_input_params clip_min_weight / clip_max_weight

# LDM's first-stage models (models/first_stage_models/vq-f4, vq-f8 config.yaml)
VQ_F4 = VAEConfig(ch=128, ch_mult=(1, 2, 4), num_res_blocks=2, z_channels=3, embed_dim=3,
                  n_embed=8192, scale_factor=1.0)
VQ_F8 = VAEConfig(ch=128, ch_mult=(1, 2, 2, 4), num_res_blocks=2, z_channels=4, embed_dim=4,
                  n_embed=16384, attn_levels=(3,), scale_factor=1.0)
# attention_resolutions [16, 8] of a 64-cell latent: only the lowest level (ds 8) exists
LDSR_UNET = UNetConfig(in_channels=6, out_channels=3, model_channels=160,
                       channel_mult=(1, 2, 2, 4), num_res_blocks=2,
                       transformer_depth=(0, 0, 0, 1), transformer_depth_middle=1,
                       num_head_channels=HEAD_CHANNELS, context_dim=0,
                       use_spatial_transformer=False)


def _config(unet: UNetConfig, vae: VAEConfig, name: str = "", default_size: int = 256,
            linear_start: float = LINEAR_START, linear_end: float = LINEAR_END) -> ModelConfig:
    return ModelConfig(FAMILY, unet, vae, (), prediction="eps", default_size=default_size,
                       linear_start=linear_start, linear_end=linear_end, name=name)


PRESETS: dict[str, ModelConfig] = {
    # the published bsr_sr model (64² low-res → 256² out at training time)
    "ldsr": _config(LDSR_UNET, VQ_F4, "ldsr"),
    # the same recipe on LDM's vq-f8: 8× super-resolution (no published weights; for training)
    "ldsr-vq-f8": _config(dataclasses.replace(LDSR_UNET, in_channels=7, out_channels=4),
                          VQ_F8, "ldsr-vq-f8", 512),
}


# ---------------------------------------------------------------- the model

class LDSRModel(nn.Module):
    """U-Net + VQ autoencoder; `state_dict()` keys are the original checkpoint's."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = VQModel(config.vae)

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> VQModel:
        return self.first_stage_model

    @property
    def text_encoders(self) -> list[nn.Module]:
        return []

    def component_params(self) -> dict[str, int]:
        """Parameter counts per component (for `sdloom info`)."""
        return {"unet": sum(p.numel() for p in self.unet.parameters()),
                "vqvae": sum(p.numel() for p in self.vae.parameters())}

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


class ConcatUNet(nn.Module):
    """The U-Net on [noisy latent ‖ low-res image] (LDM conditioning_key "concat"), no text."""

    def __init__(self, unet: UNetModel):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, c_concat):
        return self.unet(torch.cat([x, c_concat.to(x.dtype)], dim=1), t, None)


# ---------------------------------------------------------------- detection

def detect_ldsr_unet(shapes: Shapes) -> UNetConfig:
    """An LDM U-Net with legacy attention (`*.1.qkv`) and no text, from shapes."""
    what = "LDSR U-Net"
    mc, in_ch = need(shapes, UNET + "input_blocks.0.0.weight", what, 4)[:2]
    out_ch = need(shapes, UNET + "out.2.weight", what, 4)[0]
    ted = need(shapes, UNET + "time_embed.0.weight", what, 2)[0]
    blocks = indices(shapes, UNET + "input_blocks.")
    downs = [i for i in blocks if UNET + f"input_blocks.{i}.0.op.weight" in shapes]
    nrb = (downs[0] - 1) if downs else len(blocks) - 1
    if nrb < 1:
        raise DetectionError(f"not an {what}: no residual block before the first downsampler")
    mult, depth, attn = [], [], []
    for lv in range(len(downs) + 1):
        ob = 1 + lv * (nrb + 1)
        w = need(shapes, UNET + f"input_blocks.{ob}.0.out_layers.3.weight", what, 4)[0]
        mult.append(w // mc)
        depth.append(int(UNET + f"input_blocks.{ob}.1.qkv.weight" in shapes))
        attn += [w] if depth[-1] else []
    mid = int(UNET + "middle_block.1.qkv.weight" in shapes)
    attn += [mc * mult[-1]] if mid else []
    heads = (dict(num_head_channels=HEAD_CHANNELS) if all(w % HEAD_CHANNELS == 0 for w in attn)
             else dict(num_heads=1, num_head_channels=-1))
    return UNetConfig(in_channels=in_ch, out_channels=out_ch, model_channels=mc,
                      channel_mult=tuple(mult), num_res_blocks=nrb, transformer_depth=tuple(depth),
                      transformer_depth_middle=mid, context_dim=0, time_embed_mult=ted // mc,
                      num_groups=_groups([mc * m for m in mult]), use_spatial_transformer=False,
                      **heads)


def detect_vq(shapes: Shapes, prefix: str = VQ) -> VAEConfig:
    """A VQ autoencoder's config from LDM-named shapes under `prefix`."""
    v = detect_vae(shapes, prefix)
    n, dim = need(shapes, prefix + "quantize.embedding.weight", "VQ autoencoder", 2)
    if not v.use_quant_conv or dim != v.embed_dim:
        raise DetectionError(f"not a VQ autoencoder: codebook width {dim}, post_quant_conv "
                             f"input {v.embed_dim}")
    levels = tuple(i for i in range(len(v.ch_mult))
                   if prefix + f"encoder.down.{i}.attn.0.q.weight" in shapes)
    return dataclasses.replace(v, n_embed=n, attn_levels=levels, scale_factor=1.0)


def detect(shapes: Shapes) -> ModelConfig:
    unet, vae = detect_ldsr_unet(shapes), detect_vq(shapes)
    if unet.in_channels != vae.embed_dim + 3 or unet.out_channels != vae.embed_dim:
        raise DetectionError(f"not an LDSR model: the U-Net maps {unet.in_channels} → "
                             f"{unet.out_channels} channels, expected {vae.embed_dim} latent + "
                             f"3 image → {vae.embed_dim}")
    return _config(unet, vae, default_size=64 * vae.downscale)


NOT_IN_SHAPES = {"unet": ("num_heads", "num_head_channels", "num_groups"),
                 "vae": ("num_groups", "scale_factor", "shift_factor")}


def config_problems(cfg: ModelConfig, shapes: Shapes) -> list[str]:
    """Why a stored config does not describe these tensors ([] if it does)."""
    try:
        got = detect(shapes)
    except ModelFileError as e:
        return [str(e)]
    problems = [] if not cfg.text_encoders else ["an LDSR model has no text encoder"]
    for label, a, b in (("unet", cfg.unet, got.unet), ("vae", cfg.vae, got.vae)):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if f.name not in NOT_IN_SHAPES[label] and x != y:
                problems.append(f"{label}.{f.name} is {short_repr(x)} in the metadata, "
                                f"{short_repr(y)} in the tensors")
    u, v = cfg.unet, cfg.vae
    attn = [u.model_channels * m for m, d in zip(u.channel_mult, u.transformer_depth) if d]
    for name, n, ws in (("unet.num_groups", u.num_groups, [u.model_channels * m
                                                           for m in u.channel_mult]),
                        ("vae.num_groups", v.num_groups, [v.ch * m for m in v.ch_mult]),
                        ("unet heads", u.num_head_channels if u.num_head_channels != -1
                         else u.num_heads, attn)):
        if not isinstance(n, int) or n < 1 or any(w % n for w in ws):
            problems.append(f"{name} = {short_repr(n)} does not divide the widths {ws}")
    return problems


# ---------------------------------------------------------------- diffusers folders

def _qkv_from_diffusers(sd: StateDict, heads_of: Callable[[int], int]) -> StateDict:
    """diffusers' to_q/to_k/to_v/to_out.0/group_norm of the U-Net's attention blocks → LDM's
    norm, fused qkv (interleaved per head, as QKVAttentionLegacy splits it) and proj_out."""
    out = dict(sd)
    for qk in [k for k in sd if k.endswith(".to_q.weight")]:
        p = qk[:-len("to_q.weight")]
        c = sd[qk].shape[0]
        h = heads_of(c)
        for kind in ("weight", "bias"):
            q, k, v = (out.pop(f"{p}to_{n}.{kind}") for n in "qkv")
            qkv = torch.stack([t.reshape(h, c // h, *t.shape[1:]) for t in (q, k, v)], 1)
            out[f"{p}qkv.{kind}"] = qkv.reshape(3 * c, *q.shape[1:])
            if kind == "weight":
                out[f"{p}qkv.weight"] = out[f"{p}qkv.weight"][..., None]
            out[f"{p}proj_out.{kind}"] = out.pop(f"{p}to_out.0.{kind}")
            out[f"{p}norm.{kind}"] = out.pop(f"{p}group_norm.{kind}")
        out[f"{p}proj_out.weight"] = out[f"{p}proj_out.weight"][..., None]
    return out


def _qkv_to_diffusers(sd: StateDict, heads_of: Callable[[int], int]) -> StateDict:
    """The inverse of `_qkv_from_diffusers` (LDM names kept for the block prefixes)."""
    out = dict(sd)
    for key in [k for k in sd if k.endswith(".qkv.weight")]:
        p = key[:-len("qkv.weight")]
        c = sd[key].shape[1]
        h = heads_of(c)
        for kind in ("weight", "bias"):
            t = out.pop(f"{p}qkv.{kind}")
            t = t[..., 0] if kind == "weight" else t
            q, k, v = t.reshape(h, 3, c // h, *t.shape[1:]).unbind(1)
            for n, part in zip("qkv", (q, k, v)):
                out[f"{p}to_{n}.{kind}"] = part.reshape(c, *t.shape[1:])
            proj = out.pop(f"{p}proj_out.{kind}")
            out[f"{p}to_out.0.{kind}"] = proj[..., 0] if kind == "weight" else proj
            out[f"{p}group_norm.{kind}"] = out.pop(f"{p}norm.{kind}")
    return out


def _heads(u: UNetConfig) -> Callable[[int], int]:
    return lambda c: u.heads_for(c)[0]


UNET_DEFAULTS = {"time_embedding_type": "positional", "flip_sin_to_cos": True, "freq_shift": 0,
                 "center_input_sample": False, "resnet_time_scale_shift": "default",
                 "mid_block_scale_factor": 1, "class_embed_type": None, "num_class_embeds": None,
                 "act_fn": "silu"}


def _unet_from_json(uc: dict) -> UNetConfig:
    """Our UNetConfig from a diffusers `UNet2DModel` config.json (LDSR's layout only)."""
    for k, want in UNET_DEFAULTS.items():
        if uc.get(k, want) != want:
            raise ModelFileError(f"unet/config.json: {k} = {short_repr(uc[k])} is not LDSR's "
                                 f"{want!r}")
    boc = list(uc["block_out_channels"])
    lpb = uc.get("layers_per_block", 2)
    depth = tuple(int("Attn" in b) for b in uc["down_block_types"])
    hd = uc.get("attention_head_dim", 8)  # UNet2DModel's default; None: one head per block
    heads = dict(num_head_channels=int(hd)) if hd else dict(num_heads=1, num_head_channels=-1)
    return UNetConfig(in_channels=uc["in_channels"], out_channels=uc["out_channels"],
                      model_channels=boc[0], channel_mult=tuple(c // boc[0] for c in boc),
                      num_res_blocks=lpb, transformer_depth=depth,
                      transformer_depth_middle=int(uc.get("add_attention", True)), context_dim=0,
                      num_groups=uc.get("norm_num_groups", 32), use_spatial_transformer=False,
                      **heads)


def vq_config_from_diffusers(vc: dict) -> VAEConfig:
    """Our VAEConfig of a diffusers `VQModel` config.json."""
    if vc.get("norm_type", "group") != "group" or vc.get("lookup_from_codebook"):
        raise ModelFileError("vqvae/config.json: spatial norm / codebook lookup (MoVQ) is not "
                             "LDM's VQ autoencoder")
    boc = list(vc["block_out_channels"])
    z = vc.get("latent_channels", 3)
    return VAEConfig(in_channels=vc.get("in_channels", 3), out_ch=vc.get("out_channels", 3),
                     ch=boc[0], ch_mult=tuple(c // boc[0] for c in boc),
                     num_res_blocks=vc.get("layers_per_block", 1), z_channels=z,
                     embed_dim=vc.get("vq_embed_dim") or z,
                     n_embed=vc.get("num_vq_embeddings", 256),
                     num_groups=vc.get("norm_num_groups", 32), scale_factor=1.0,
                     attn_levels=tuple(i for i, b in enumerate(vc["down_block_types"])
                                       if "Attn" in b))


def open_ldsr_diffusers(name: str, component: ComponentReader, json_of: JsonReader
                        ) -> tuple[ModelConfig, StateDict]:
    where = f"diffusers folder {name}"
    unet = _unet_from_json(json_of("unet/config.json"))
    vae = vq_config_from_diffusers(json_of("vqvae/config.json"))
    uw = mapped(where + "/unet", unet_diffusers_to_ldm, component("unet"), unet)
    sd = {UNET + k: v for k, v in _qkv_from_diffusers(uw, _heads(unet)).items()}
    sd.update({VQ + k: v for k, v in mapped(where + "/vqvae", vae_diffusers_to_ldm,
                                             component("vqvae")).items()})
    sched = json_of("scheduler/scheduler_config.json") if component.has("scheduler") else {}
    if sched.get("prediction_type", "epsilon") != "epsilon":
        raise ModelFileError(f"{where}: LDSR predicts epsilon, the scheduler says "
                             f"{short_repr(sched['prediction_type'])}")
    cfg = _config(unet, vae, default_size=64 * vae.downscale,
                  linear_start=sched.get("beta_start", LINEAR_START),
                  linear_end=sched.get("beta_end", LINEAR_END))
    check_folder(where, config_problems(cfg, {k: tuple(v.shape) for k, v in sd.items()}))
    return cfg, sd


def save_ldsr_diffusers(cfg: ModelConfig, get: Callable[[str], torch.Tensor],
                        keys: Sequence[str], folder: Path,
                        save_tensors: Callable[[StateDict, Path], None]) -> None:
    """unet/ (UNet2DModel) vqvae/ (VQModel) scheduler/ (DDIM as LDM runs it) and
    model_index.json, as the published CompVis/ldm-super-resolution-4x-openimages folder."""
    take = lambda p: {k[len(p):]: get(k) for k in keys if k.startswith(p)}  # noqa: E731

    def write(sub: str, sd: dict, config: dict) -> None:
        save_tensors(sd, folder / sub / "diffusion_pytorch_model.safetensors")
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))

    u, v = cfg.unet, cfg.vae
    uw = unet_ldm_to_diffusers(_qkv_to_diffusers(take(UNET), _heads(u)), u)
    attn = [u.model_channels * m for m, d in zip(u.channel_mult, u.transformer_depth) if d]
    hd = u.heads_for(attn[0] if attn else u.model_channels * u.channel_mult[-1])[1]
    down = ["AttnDownBlock2D" if d else "DownBlock2D" for d in u.transformer_depth]
    write("unet", uw, {
        "_class_name": "UNet2DModel", "sample_size": cfg.default_size // v.downscale,
        "in_channels": u.in_channels, "out_channels": u.out_channels,
        "block_out_channels": [u.model_channels * m for m in u.channel_mult],
        "layers_per_block": u.num_res_blocks, "down_block_types": down,
        "up_block_types": [b.replace("Down", "Up") for b in reversed(down)],
        "attention_head_dim": hd, "norm_num_groups": u.num_groups, "norm_eps": 1e-5,
        "add_attention": bool(u.transformer_depth_middle), **UNET_DEFAULTS})
    vdown = ["AttnDownEncoderBlock2D" if i in v.attn_levels else "DownEncoderBlock2D"
             for i in range(len(v.ch_mult))]
    write("vqvae", vae_ldm_to_diffusers(take(VQ)), {
        "_class_name": "VQModel", "in_channels": v.in_channels, "out_channels": v.out_ch,
        "down_block_types": vdown,
        "up_block_types": [b.replace("DownEncoder", "UpDecoder") for b in reversed(vdown)],
        "block_out_channels": [v.ch * m for m in v.ch_mult], "layers_per_block": v.num_res_blocks,
        "latent_channels": v.z_channels, "vq_embed_dim": v.embed_dim,
        "num_vq_embeddings": v.n_embed, "norm_num_groups": v.num_groups,
        "sample_size": cfg.default_size, "scaling_factor": v.scale_factor, "act_fn": "silu"})
    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
        "_class_name": "DDIMScheduler", "beta_start": cfg.linear_start,
        "beta_end": cfg.linear_end, "beta_schedule": "scaled_linear",
        "num_train_timesteps": cfg.num_timesteps, "clip_sample": False,
        "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon",
        "trained_betas": None}, indent=2))
    index = {"_class_name": "LDMSuperResolutionPipeline", "unet": ["diffusers", "UNet2DModel"],
             "vqvae": ["diffusers", "VQModel"], "scheduler": ["diffusers", "DDIMScheduler"]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


# ---------------------------------------------------------------- the family

class LDSRFamily(Family):
    names = (FAMILY,)
    pipeline_classes = ("LDMSuperResolutionPipeline",)

    def claims(self, shapes: Shapes) -> bool:
        return EMBED in shapes and UNET + "input_blocks.0.0.weight" in shapes

    # the module's own functions (Family documents each)
    detect = staticmethod(detect)
    config_from_dict = staticmethod(ModelConfig.from_dict)
    config_problems = staticmethod(config_problems)
    build = staticmethod(LDSRModel)

    def open_diffusers(self, name: str, component: ComponentReader, json_of: JsonReader
                       ) -> tuple[ModelConfig, StateDict]:
        return open_ldsr_diffusers(name, component, json_of)

    def save_diffusers(self, cfg, get, keys, folder, save_tensors) -> None:
        save_ldsr_diffusers(cfg, get, keys, folder, save_tensors)

    def describe(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        f = cfg.vae.downscale
        return [("prediction", cfg.prediction),
                ("upscale", f"x{f} (VQ-f{f} latent, low-res image concatenated)"),
                ("codebook", f"{cfg.vae.n_embed} × {cfg.vae.embed_dim}")]

    def latent_format(self, cfg: ModelConfig) -> LatentFormat:
        v = cfg.vae
        return LatentFormat(v.embed_dim, v.downscale, v.scale_factor, v.shift_factor)

    def model_sampling(self, cfg: ModelConfig) -> DiscreteSampling:
        return DiscreteSampling(DiscreteSchedule.scaled_linear(
            cfg.num_timesteps, cfg.linear_start, cfg.linear_end), cfg.prediction)

    def denoiser_model(self, model: LDSRModel) -> nn.Module:
        return ConcatUNet(model.unet)  # c_concat = the low-res image in [-1, 1]

    def prompt_encoder(self, model, embeddings):
        raise SdloomError("LDSR takes no prompt: it is conditioned on the low-res image")

    def cond_kwargs(self, cfg, c, width, height, aesthetic_score, device, dtype) -> dict:
        return {}

    def training_refusal(self, cfg, what: str) -> str | None:
        if what in ("vae", "unet"):  # the VQ autoencoder (training/vq_train.py), the U-Net
            return None
        return f"what={what} does not apply to LDSR: what=vae (its VQ autoencoder) or unet"

    def training_conditioning(self, model: LDSRModel) -> LowResConcat:
        return LowResConcat(model.config)

    def generation_refusal(self, cfg) -> str | None:
        return ("LDSR upscales images rather than generating them: put it in --upscaler-dir "
                "and use `sdloom upscale` or --hires-upscaler LDSR")

    def control_base(self, cfg):
        raise SdloomError("ControlNet does not apply to LDSR")

    def controlled_model(self, model, control):
        raise SdloomError("ControlNet does not apply to LDSR")


# ---------------------------------------------------------------- training and upscaling

class LowResConcat:
    """What `sdloom train what=unet` conditions LDSR's U-Net on: the high-res batch made f×
    smaller (antialiased bicubic, rounded to 8-bit levels: x4_upscaler.low_res_of's rule) and
    concatenated to the noisy latent; no text. LDM trained bsr_sr on BSR degradations (blur,
    noise, JPEG); this is the plain bicubic case."""

    def __init__(self, cfg: ModelConfig):
        self.f = cfg.vae.downscale

    def prepare(self, captions: list[str], size: tuple[int, int], device: torch.device
                ) -> dict:
        return {}

    def low_res(self, high: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        low = F.interpolate(high.float(), scale_factor=1 / self.f, mode="bicubic",
                            antialias=True, align_corners=False)
        return {"c_concat": (((low.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1)
                .to(high.dtype)}

    def __call__(self, prepared: dict) -> dict[str, torch.Tensor]:
        return {"c_concat": prepared["c_concat"]}


def _weighting(h: int, w: int) -> torch.Tensor:
    """LDM's patch weights (`delta_border` clipped to [0.01, 0.5]): the normalised distance to
    the nearest patch border."""
    y = torch.arange(h, dtype=torch.float32)[:, None] / max(h - 1, 1)
    x = torch.arange(w, dtype=torch.float32)[None] / max(w - 1, 1)
    edge = torch.minimum(torch.minimum(y, x), torch.minimum(1 - y, 1 - x))
    return edge.clamp(CLIP_MIN, CLIP_MAX)


def split_apply(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor],
                tile: int = TILE, stride: int = STRIDE, scale: int = 1) -> torch.Tensor:
    """fn over overlapping patches of `inputs` (same H×W), outputs (`scale`× the patch) blended
    with `_weighting` and normalised, as LDM's `split_input_params` path (apply_model,
    decode_first_stage): nn.Unfold patches of `tile` every `stride` cells, nn.Fold back.
    Inputs no larger than a tile go through fn whole."""
    b, _, h, w = inputs[0].shape
    kh, kw, sh, sw = min(tile, h), min(tile, w), min(stride, h), min(stride, w)
    if (kh, kw) == (h, w):
        return fn(*inputs)
    if (h - kh) % sh or (w - kw) % sw:
        raise SdloomError(f"{h}x{w} latent cells are not covered by {tile}-cell patches every "
                          f"{stride}: pad the image to a multiple of {stride}")
    patches = [F.unfold(t, (kh, kw), stride=(sh, sw)).view(b, t.shape[1], kh, kw, -1)
               for t in inputs]
    n = patches[0].shape[-1]
    wt = _weighting(kh * scale, kw * scale).to(inputs[0].device)
    out = torch.stack([fn(*(p[..., i] for p in patches)).float() for i in range(n)], -1)
    out = (out * wt[..., None]).reshape(b, -1, n)
    fold = dict(output_size=(h * scale, w * scale), kernel_size=(kh * scale, kw * scale),
                stride=(sh * scale, sw * scale))
    norm = F.fold(wt.reshape(1, -1, 1).expand(1, -1, n), **fold)
    return F.fold(out, **fold) / norm


class SplitUNet(nn.Module):
    """ConcatUNet over LDM's overlapping patches (one patch when the latent fits a tile)."""

    def __init__(self, inner: nn.Module, tile: int = TILE, stride: int = STRIDE):
        super().__init__()
        self.inner, self.tile, self.stride = inner, tile, stride

    def forward(self, x, t, c_concat):
        return split_apply(lambda xp, cp: self.inner(xp, t, cp), [x, c_concat.to(x.dtype)],
                           self.tile, self.stride).to(x.dtype)


def ddim_sigmas(steps: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """LDM's DDIM timesteps 1 + k·(T // steps) as sigmas, highest first, ending at σ(t = 0)
    rather than 0: the last step goes to ᾱ_0 (DDIMSampler's alphas_prev[0]; diffusers'
    set_alpha_to_one=False)."""
    return torch.cat([ddim_uniform(steps, schedule)[:-1], schedule.sigmas[:1]])


@torch.no_grad()
def sample_latents(model: LDSRModel, low: torch.Tensor, noise: torch.Tensor, *,
                   steps: int = STEPS, eta: float = ETA, generator: torch.Generator | None = None,
                   tile: int = TILE, stride: int = STRIDE) -> torch.Tensor:
    """LDM's DDIM from unit noise `noise` [B, C, h, w] to the latent of the 4× image of
    `low` [B, 3, h, w] in [-1, 1]; eta > 0 draws its step noise from `generator`. The
    samplers run in σ (x = x_vp·√(1 + σ²)), so the VP start and end are converted here."""
    if steps < 1:
        raise SdloomError(f"LDSR needs at least 1 step, got {steps}")
    fam = LDSRFamily()
    ms = fam.model_sampling(model.config)
    dev, dt = model.device, model.dtype
    denoiser = ms.denoiser(SplitUNet(fam.denoiser_model(model), tile, stride))
    sigmas = ddim_sigmas(steps, ms.schedule)
    x = noise.to(dev, torch.float32) * math.sqrt(1 + float(sigmas[0]) ** 2)
    x = sample("DDIM", None, denoiser, x, sigmas, generator=generator, eta=eta,
               extra_args={"c_concat": low.to(dev, dt)})
    return x / math.sqrt(1 + float(sigmas[-1]) ** 2)


@torch.no_grad()
def upscale_image(model: LDSRModel, low: torch.Tensor, *, steps: int = STEPS,
                  eta: float = ETA, seed: int = 0, tile: int = TILE,
                  stride: int = STRIDE) -> torch.Tensor:
    """Low-res images [B, 3, h, w] in [-1, 1] → f× images [B, 3, f·h, f·w] in [-1, 1]: padded
    with edge pixels to multiples of 64 (at least 128) as A1111 does, sampled (the start noise
    and the eta noise from a CPU generator seeded with `seed`), decoded in patches, cropped."""
    b, _, h, w = low.shape
    ph, pw = (max(2, math.ceil(n / PAD)) * PAD - n for n in (h, w))
    x = F.pad(low.float(), (0, pw, 0, ph), mode="replicate") if ph or pw else low.float()
    g = torch.Generator().manual_seed(int(seed))
    noise = torch.randn((b, model.config.unet.out_channels, *x.shape[-2:]), generator=g)
    z = sample_latents(model, x, noise, steps=steps, eta=eta, generator=g, tile=tile,
                       stride=stride)
    f = model.config.vae.downscale
    vae = model.vae
    img = split_apply(lambda zp: vae.image_from_latent(zp.to(model.dtype)).float(), [z],
                      tile, stride, f)
    return img[..., :h * f, :w * f].clamp(-1, 1).cpu()
