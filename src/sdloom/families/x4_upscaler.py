"""The SD x4 upscaler: Stability AI's `x4-upscaler-ema` single file and the diffusers
`StableDiffusionUpscalePipeline` folder, as a family of its own.

A latent upscaler (Rombach et al. 2022, `LatentUpscaleDiffusion`): the U-Net sees 7 channels,
4 of latent and the 3 of the low-res image itself (an f=4 VAE makes the latent the low-res
image's size), after that image is noised to `noise_level` on its own schedule
(`ImageConcatWithNoiseAugmentation`); the noise level is a class label (`label_emb`, 1000
classes). v-prediction, OpenCLIP-H penultimate context (SD2's text path), latent scale 0.08333.
The first levels' transformers have `disable_self_attn` (attn1 attends to the text too).

Keys: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.model.*`; the
schedule buffers of `low_scale_model.*` are dropped (their values are the constants below).
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

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig
from ..errors import ModelFileError, SdloomError
from ..prompts import Conditioning, EmbeddingDB, PromptEncoder
from ..sampling.denoisers import CFGDenoiser, sample, sampling_sigmas
from ..sampling.model_sampling import DiscreteSampling
from ..sampling.schedules import DiscreteSchedule
from ..tokenizer import get_tokenizer
from .base import (ComponentReader, DetectionError, Family, JsonReader, LatentFormat, Shapes,
                   StateDict, need, short_repr)
from .keymaps.clip import clip_hf_to_openclip, clip_openclip_to_hf, normalize_hf_clip
from .keymaps.unet import unet_config_from_diffusers, unet_diffusers_to_ldm, unet_ldm_to_diffusers
from .keymaps.vae import vae_diffusers_to_ldm, vae_ldm_to_diffusers
from .sd import LatentDiffusion, UNetAdapter
from .sd_detect import (TEXT_NOT_IN_SHAPES, UNET_NOT_IN_SHAPES, VAE_NOT_IN_SHAPES,
                        detect_text_encoder, detect_unet, detect_vae)
from .sd_diffusers import (_text_json, _unet_json, _vae_json, check_folder, mapped,
                           text_config_from_hf, vae_config_from_diffusers,
                           write_clip_tokenizer)

FAMILY = "sd-x4-upscaler"
UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
LABEL = UNET + "label_emb.weight"  # nn.Embedding [num_classes, time_embed_dim]
LATENT_SCALE = 0.08333  # x4-upscaling.yaml scale_factor
MAX_NOISE_LEVEL = 350  # x4-upscaling.yaml low_scale_config.max_noise_level
DEFAULT_NOISE_LEVEL = 20  # diffusers StableDiffusionUpscalePipeline
# LDM's "linear" betas are linear in √β (diffusers "scaled_linear"), for the diffusion and for
# the low-res image's noise augmentation alike; both 1e-4…2e-2 over 1000 steps
LINEAR_START, LINEAR_END = 1e-4, 2e-2
# the published config's disable_self_attentions; shapes cannot tell it when the context is as
# wide as a level's attention (see `_no_self_attn`)
PUBLISHED_NO_SELF = (True, True, True, False)


# sdloom's embedded upscaler (docs/embedded-model.md): this family at small width, trained on
# emoji, 128² → 512². Text is not used: captions are empty in training (caption_dropout 1)
# and upscaling runs the empty prompt, so the text encoder is a frozen tiny one whose output
# for "" is a fixed context. GroupNorm groups and heads are what detection assumes (the
# largest power of two ≤ 32 dividing the widths; 8 heads): a file of it loads from shapes.
EMOJI_X4 = ModelConfig(
    FAMILY,
    UNetConfig(in_channels=7, out_channels=4, model_channels=48, channel_mult=(1, 2, 2),
               num_res_blocks=2, transformer_depth=(0, 0, 1), transformer_depth_middle=1,
               num_heads=8, context_dim=16, use_linear_in_transformer=True, num_groups=16,
               num_classes=1000, disable_self_attentions=(False, False, False)),
    VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, num_groups=32,
              scale_factor=LATENT_SCALE),
    (TextEncoderConfig(layout="openclip", width=16, layers=1, heads=1, act="gelu",
                       projection_dim=16, hidden_layer=-2, pad_token=0),),
    prediction="v", default_size=512, linear_start=LINEAR_START, linear_end=LINEAR_END,
    name="emoji-x4")
PRESETS = {"emoji-x4": EMOJI_X4}


def augmentation_schedule() -> DiscreteSchedule:
    return DiscreteSchedule.scaled_linear(1000, LINEAR_START, LINEAR_END)


def noise_augment(low: torch.Tensor, noise: torch.Tensor,
                  noise_level: int | torch.Tensor) -> torch.Tensor:
    """q(x_t | x_0) of the low-res image at t = noise_level (one level, or one per image):
    √ᾱ·x + √(1 − ᾱ)·ε (LDM AbstractLowScaleModel.q_sample; diffusers low_res_scheduler
    .add_noise)."""
    levels = torch.as_tensor(noise_level).long().flatten().cpu()
    if levels.numel() == 0 or levels.min() < 0 or levels.max() > MAX_NOISE_LEVEL:
        raise SdloomError(f"noise_level must be in 0…{MAX_NOISE_LEVEL}, got {noise_level}")
    a = augmentation_schedule().alphas_cumprod[levels].double()
    shape = (-1,) + (1,) * (low.ndim - 1)
    sa = a.sqrt().float().view(shape).to(low.device)
    sb = (1 - a).sqrt().float().view(shape).to(low.device)
    return (sa * low.float() + sb * noise.float()).to(low.dtype)


def low_res_of(high: torch.Tensor, factor: int = 4) -> torch.Tensor:
    """The `factor`× smaller image [B,3,h/f,w/f] of images in [-1, 1]: antialiased bicubic,
    rounded to 8-bit levels as a saved image would be. What the embedded upscalers train on
    and are measured with."""
    low = F.interpolate(high.float(), scale_factor=1 / factor, mode="bicubic", antialias=True,
                        align_corners=False)
    return (((low.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1).to(high.dtype)


class LowResConditioning:
    """Training conditioning of the x4 upscaler (LDM `LatentUpscaleDiffusion`): the captions'
    (`base`, the trainer's text conditioning) plus the high-res batch made 4× smaller
    (`low_res_of`) and noised to a noise level drawn uniformly from [0, max_noise_level) per
    image, which is also the class label `y`. `crop` > 0: the training windows' side (the data
    set cuts them, ImageCaptionDataset's `window`), which the latent grid must divide."""

    def __init__(self, base, cfg: ModelConfig, crop: int = 0):
        self.base = base
        u = cfg.unet
        multiple = cfg.vae.downscale * 2 ** (len(u.channel_mult) - 1)
        if crop % multiple:
            raise SdloomError(f"x4_crop must be a multiple of {multiple} for this model")
        if (cfg.family != FAMILY or u.in_channels != cfg.vae.embed_dim + 3
                or (u.num_classes or 0) < MAX_NOISE_LEVEL):
            raise SdloomError("what=x4 trains an SD x4 upscaler (a U-Net with 3 extra input "
                              "channels and a noise-level embedding), not this "
                              f"{cfg.family} model")

    def prepare(self, captions: list[str], size: tuple[int, int], device: torch.device
                ) -> dict:
        return self.base.prepare(captions, size, device)

    def low_res(self, high: torch.Tensor, gen: torch.Generator) -> dict[str, torch.Tensor]:
        """{"c_concat": the noised low-res images, "y": their noise levels}, to add to what
        prepare() gave; the draws come from the CPU generator `gen` (the same run on any
        device)."""
        low = low_res_of(high)
        levels = torch.randint(0, MAX_NOISE_LEVEL, (high.shape[0],), generator=gen)
        noise = torch.randn(low.shape, generator=gen)
        return {"c_concat": noise_augment(low, noise.to(low.device), levels),
                "y": levels.to(low.device)}

    def __call__(self, prepared: dict) -> dict[str, torch.Tensor]:
        return {**self.base(prepared), "c_concat": prepared["c_concat"], "y": prepared["y"]}


# ---------------------------------------------------------------- detection

def _no_self_attn(shapes: Shapes, u: UNetConfig) -> tuple[bool, ...]:
    """Per level: attn1's keys read the context (width context_dim) instead of the image."""
    out = []
    n = u.num_res_blocks
    for lv, (mult, depth) in enumerate(zip(u.channel_mult, u.transformer_depth)):
        if not depth:
            out.append(False)
            continue
        key = UNET + f"input_blocks.{1 + lv * (n + 1)}.1.transformer_blocks.0.attn1.to_k.weight"
        width = need(shapes, key, "SD x4 upscaler U-Net", 2)[1]
        inner = u.model_channels * mult
        if width == u.context_dim == inner:  # both readings fit: the published convention
            out.append(PUBLISHED_NO_SELF[lv] if lv < len(PUBLISHED_NO_SELF) else False)
        else:
            out.append(width == u.context_dim)
    return tuple(out)


def detect_x4_unet(shapes: Shapes) -> UNetConfig:
    """The U-Net's config: SD's shape reading, plus the label embedding and attn1's inputs.
    Heads: the published model has 8 at every level (not SD2's 64-wide heads)."""
    u = detect_unet(shapes)
    classes = need(shapes, LABEL, "SD x4 upscaler U-Net", 2)[0]
    widths = [u.model_channels * m for m, d in zip(u.channel_mult, u.transformer_depth) if d]
    heads = 8 if all(w % 8 == 0 for w in widths) else 1
    u = dataclasses.replace(u, num_heads=heads, num_head_channels=-1, num_classes=classes)
    return dataclasses.replace(u, disable_self_attentions=_no_self_attn(shapes, u))


def detect(shapes: Shapes) -> ModelConfig:
    unet = detect_x4_unet(shapes)
    vae = dataclasses.replace(detect_vae(shapes), scale_factor=LATENT_SCALE)
    te = detect_text_encoder(shapes, TEXT)
    if te is None or te.layout != "openclip":
        raise DetectionError("SD x4 upscaler without its OpenCLIP text encoder: missing "
                             "cond_stage_model.model.*")
    if unet.in_channels != vae.embed_dim + 3:
        raise DetectionError(f"not an SD x4 upscaler: the U-Net takes {unet.in_channels} "
                             f"channels, expected {vae.embed_dim} latent + 3 image")
    # image_size 128 latents = 128 low-res pixels → 512 out
    return ModelConfig(FAMILY, unet, vae, (te,), prediction="v", default_size=512,
                       linear_start=LINEAR_START, linear_end=LINEAR_END)


# what SD's detection cannot read from shapes either (one list for both families)
NOT_IN_SHAPES = {"unet": UNET_NOT_IN_SHAPES, "vae": VAE_NOT_IN_SHAPES, "text": TEXT_NOT_IN_SHAPES}


def config_problems(cfg: ModelConfig, shapes: Shapes) -> list[str]:
    """Why a stored config does not describe these tensors ([] if it does)."""
    try:
        got = detect(shapes)
    except ModelFileError as e:
        return [str(e)]
    if len(cfg.text_encoders) != 1:
        return [f"text_encoders: {len(cfg.text_encoders)} in the metadata, 1 in the tensors"]
    problems = []
    for label, a, b, skip in (("unet", cfg.unet, got.unet, NOT_IN_SHAPES["unet"]),
                              ("vae", cfg.vae, got.vae, NOT_IN_SHAPES["vae"]),
                              ("text_encoders[0]", cfg.text_encoders[0], got.text_encoders[0],
                               NOT_IN_SHAPES["text"])):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if f.name not in skip and x != y:
                problems.append(f"{label}.{f.name} is {short_repr(x)} in the metadata, "
                                f"{short_repr(y)} in the tensors")
    u = cfg.unet
    attn = [u.model_channels * m for m, d in zip(u.channel_mult, u.transformer_depth) if d]
    for name, n in (("unet.num_heads", u.num_heads), ("unet.num_groups", u.num_groups)):
        ws = attn if name.endswith("heads") else [u.model_channels * m for m in u.channel_mult]
        if not isinstance(n, int) or n < 1 or any(w % n for w in ws):
            problems.append(f"{name} = {short_repr(n)} does not divide the widths {ws}")
    return problems


# ---------------------------------------------------------------- diffusers folders

def _unet_from_json(uc: dict) -> UNetConfig:
    u = unet_config_from_diffusers(uc)
    ocs = uc.get("only_cross_attention", False)
    ocs = [bool(ocs)] * len(u.channel_mult) if isinstance(ocs, bool) else [bool(o) for o in ocs]
    # levels without attention carry no flag (as detection reads them)
    ocs = tuple(o and bool(d) for o, d in zip(ocs, u.transformer_depth))
    classes = uc.get("num_class_embeds")
    if not classes:
        raise ModelFileError("unet/config.json has no num_class_embeds: not an x4 upscaler")
    return dataclasses.replace(u, num_classes=int(classes), disable_self_attentions=ocs)


def open_x4_diffusers(name: str, component: ComponentReader, json_of: JsonReader
                      ) -> tuple[ModelConfig, StateDict]:
    where = f"diffusers folder {name}"
    unet = _unet_from_json(json_of("unet/config.json"))
    vc = json_of("vae/config.json")
    vae = dataclasses.replace(vae_config_from_diffusers(vc, False),
                              scale_factor=vc.get("scaling_factor") or LATENT_SCALE)
    uw = dict(component("unet"))
    label = uw.pop("class_embedding.weight", None)
    if label is None:
        raise ModelFileError(f"{where}/unet: no class_embedding.weight (the noise-level "
                             "embedding)")
    sd = {UNET + k: v for k, v in mapped(where + "/unet", unet_diffusers_to_ldm, uw,
                                          unet).items()}
    sd[LABEL] = label
    sd.update({VAE + k: v for k, v in mapped(where + "/vae", vae_diffusers_to_ldm,
                                              component("vae")).items()})
    # diffusers keeps SD2's encoder without its unused last layer: "last + final norm" here is
    # the original "penultimate + ln_final"
    te = text_config_from_hf(json_of("text_encoder/config.json"))
    if te.layout != "openclip":
        raise ModelFileError(f"{where}/text_encoder: an x4 upscaler's encoder is OpenCLIP-H "
                             "(gelu), this one is not")
    w = normalize_hf_clip(component("text_encoder"))
    sd.update({TEXT + "model." + k: v for k, v in mapped(
        where + "/text_encoder", clip_hf_to_openclip, w, te.layers).items()})
    sched = json_of("scheduler/scheduler_config.json") if component.has("scheduler") else {}
    pred = "eps" if sched.get("prediction_type") == "epsilon" else "v"
    cfg = ModelConfig(FAMILY, unet, vae, (te,), prediction=pred, default_size=512,
                      linear_start=sched.get("beta_start", LINEAR_START),
                      linear_end=sched.get("beta_end", LINEAR_END))
    check_folder(where, config_problems(cfg, {k: tuple(v.shape) for k, v in sd.items()}))
    return cfg, sd


def save_x4_diffusers(cfg: ModelConfig, get: Callable[[str], torch.Tensor],
                      keys: Sequence[str], folder: Path,
                      save_tensors: Callable[[StateDict, Path], None]) -> None:
    """The published folder's layout: unet/ vae/ text_encoder/ tokenizer/ scheduler/ (DDIM)
    low_res_scheduler/ (DDPM), model_index.json with max_noise_level."""
    take = lambda p: {k[len(p):]: get(k) for k in keys if k.startswith(p)}  # noqa: E731

    def write(sub: str, name: str, sd: dict, config: dict) -> None:
        save_tensors(sd, folder / sub / name)
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))

    u = cfg.unet
    uw = take(UNET)
    label = uw.pop("label_emb.weight")
    uw = unet_ldm_to_diffusers(uw, u)
    uw["class_embedding.weight"] = label
    uj = _unet_json(u, cfg.default_size // 4)
    uj.update(num_class_embeds=u.num_classes,
              only_cross_attention=list(u.disable_self_attentions or
                                        (False,) * len(u.channel_mult)))
    write("unet", "diffusion_pytorch_model.safetensors", uw, uj)
    write("vae", "diffusion_pytorch_model.safetensors", vae_ldm_to_diffusers(take(VAE)),
          _vae_json(cfg.vae, cfg.default_size))
    te = cfg.text_encoders[0]
    tw = clip_openclip_to_hf(take(TEXT + "model."))
    layers = te.layers
    if te.hidden_layer == -2:  # drop the unused last layer, as the published folders do
        layers -= 1
        drop = f"text_model.encoder.layers.{layers}."
        tw = {k: v for k, v in tw.items() if not k.startswith(drop)}
    tw.pop("text_projection.weight", None)
    text = _text_json(te, layers)
    write("text_encoder", "model.safetensors", tw, text)
    write_clip_tokenizer(folder / "tokenizer", te)
    common = {"beta_start": cfg.linear_start, "beta_end": cfg.linear_end,
              "beta_schedule": "scaled_linear", "num_train_timesteps": cfg.num_timesteps,
              "clip_sample": False, "trained_betas": None}
    scheds = {"scheduler": {"_class_name": "DDIMScheduler", **common,
                            "prediction_type": "v_prediction" if cfg.prediction == "v"
                            else "epsilon", "set_alpha_to_one": False, "steps_offset": 1},
              "low_res_scheduler": {"_class_name": "DDPMScheduler", **common,
                                    "beta_start": LINEAR_START, "beta_end": LINEAR_END,
                                    "prediction_type": "epsilon", "clip_sample": True,
                                    "variance_type": "fixed_small"}}
    for sub, sc in scheds.items():
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / "scheduler_config.json").write_text(json.dumps(sc, indent=2))
    index = {"_class_name": "StableDiffusionUpscalePipeline",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", text["architectures"][0]],
             "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDIMScheduler"],
             "low_res_scheduler": ["diffusers", "DDPMScheduler"],
             "max_noise_level": MAX_NOISE_LEVEL, "safety_checker": [None, None],
             "feature_extractor": [None, None], "watermarker": [None, None]}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))


# ---------------------------------------------------------------- the family

class X4UpscalerFamily(Family):
    names = (FAMILY,)
    pipeline_classes = ("StableDiffusionUpscalePipeline",)

    def claims(self, shapes: Shapes) -> bool:
        # a plain class embedding (SDXL's ADM is label_emb.0.0.*) on a 4+3-channel input
        return LABEL in shapes and len(tuple(shapes[LABEL])) == 2

    # the module's own functions (Family documents each)
    detect = staticmethod(detect)
    config_from_dict = staticmethod(ModelConfig.from_dict)
    config_problems = staticmethod(config_problems)
    build = staticmethod(LatentDiffusion)

    def optional_keys(self, model: LatentDiffusion) -> set[str]:
        return {TEXT + "model.logit_scale", TEXT + "model.text_projection"}

    def key_aliases(self, shapes: Shapes) -> dict[str, str | None]:
        """The noise augmentation's schedule buffers: constants here, not weights."""
        return {k: None for k in shapes if k.startswith("low_scale_model.")}

    def open_diffusers(self, name: str, component: ComponentReader, json_of: JsonReader
                       ) -> tuple[ModelConfig, StateDict]:
        return open_x4_diffusers(name, component, json_of)

    def save_diffusers(self, cfg, get, keys, folder, save_tensors) -> None:
        save_x4_diffusers(cfg, get, keys, folder, save_tensors)

    def describe(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        te = cfg.text_encoders[0]
        return [("prediction", cfg.prediction), ("upscale", "x4 (latent, noise-augmented)"),
                ("native size", f"{cfg.default_size // 4} → {cfg.default_size}"),
                ("text enc 0", f"{te.layout} width {te.width}, {te.layers} layers, "
                 f"hidden layer {te.hidden_layer}")]

    def latent_format(self, cfg: ModelConfig) -> LatentFormat:
        v = cfg.vae
        return LatentFormat(v.embed_dim, v.downscale, v.scale_factor, v.shift_factor)

    def model_sampling(self, cfg: ModelConfig) -> DiscreteSampling:
        return DiscreteSampling(DiscreteSchedule.scaled_linear(
            cfg.num_timesteps, cfg.linear_start, cfg.linear_end), cfg.prediction)

    def denoiser_model(self, model: LatentDiffusion) -> nn.Module:
        return UNetAdapter(model.unet)  # c_concat = the noised low-res image, y = noise level

    def prompt_encoder(self, model: LatentDiffusion, embeddings: EmbeddingDB) -> PromptEncoder:
        return PromptEncoder(get_tokenizer(), model.text_encoders,
                             list(model.config.text_encoders), embeddings)

    def cond_kwargs(self, cfg, c: Conditioning, width, height, aesthetic_score, device, dtype
                    ) -> dict[str, torch.Tensor]:
        return {"context": c.context.to(device, dtype)}

    def size_multiple(self, cfg: ModelConfig) -> int:
        return 4

    def training_refusal(self, cfg, what: str) -> str | None:
        if what in ("vae", "x4"):
            return None
        return ("an SD x4 upscaler trains with what=vae (its f=4 VAE) or what=x4 (its U-Net "
                "on low-res inputs; text encoder frozen)")

    def trains_text_encoder(self, model: LatentDiffusion) -> bool:
        # SD2's one OpenCLIP: training reads captions as its ids (frozen under what=x4)
        return True

    def generation_refusal(self, cfg) -> str | None:
        return ("the SD x4 upscaler upscales images rather than generating them: put it in "
                "--upscaler-dir and use `sdloom upscale` or --hires-upscaler")

    def control_base(self, cfg):
        raise SdloomError("ControlNet does not apply to the SD x4 upscaler")

    def controlled_model(self, model, control):
        raise SdloomError("ControlNet does not apply to the SD x4 upscaler")


# ---------------------------------------------------------------- upscaling

@torch.no_grad()
def upscale_latents(model: LatentDiffusion, low: torch.Tensor, cond: torch.Tensor,
                    uncond: torch.Tensor | None, noise: torch.Tensor, aug_noise: torch.Tensor,
                    *, noise_level: int = DEFAULT_NOISE_LEVEL, steps: int = 20,
                    sampler: str = "DDIM", scheduler: str | None = None,
                    cfg_scale: float = 1.0, generator: torch.Generator | None = None
                    ) -> torch.Tensor:
    """Sample the 4× latent for low-res images `low` [B,3,h,w] in [-1, 1]: the image is noised
    to `noise_level` with `aug_noise` and concatenated to the latent each step; `noise` [B,4,h,w]
    is the unit starting noise; cond/uncond are text contexts [B,77·k,D]."""
    fam = X4UpscalerFamily()
    ms = fam.model_sampling(model.config)
    dev, dt = model.device, model.dtype
    image = noise_augment(low.to(dev, torch.float32), aug_noise.to(dev), noise_level).to(dt)
    level = torch.full((low.shape[0],), int(noise_level), dtype=torch.long, device=dev)
    denoiser = ms.denoiser(fam.denoiser_model(model))
    cfg = CFGDenoiser(denoiser, lambda _: {"context": cond.to(dev, dt)},
                      lambda _: {"context": (cond if uncond is None else uncond).to(dev, dt)},
                      cfg_scale if uncond is not None else 1.0)
    sigmas = sampling_sigmas(sampler, scheduler, steps, ms.schedule)
    x = ms.noised(torch.zeros_like(noise, device=dev, dtype=torch.float32),
                  noise.to(dev, torch.float32), sigmas[0].item())
    return sample(sampler, scheduler, cfg, x, sigmas, generator=generator,
                  extra_args={"c_concat": image, "y": level})


def _ramp(n: int, overlap: int, first: bool, last: bool) -> torch.Tensor:
    """Blend weights along one side of a tile: linear ramps over the overlap, 1 elsewhere."""
    w = torch.ones(n)
    r = torch.arange(1, overlap + 1, dtype=torch.float32) / (overlap + 1)
    if overlap and not first:
        w[:overlap] = r
    if overlap and not last:
        w[n - overlap:] = r.flip(0)
    return w


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def tiled(fn: Callable[[int, int, int, int], torch.Tensor], height: int, width: int,
          tile: int, overlap: int, scale: int) -> torch.Tensor:
    """fn(top, left, h, w) → the `scale`× result [B,C,h·s,w·s] of that low-res region, over
    overlapping tiles at most `tile` wide, blended with linear ramps (weights sum to 1)."""
    if overlap >= tile and (height > tile or width > tile):
        raise SdloomError(f"tile overlap {overlap} must be smaller than the tile {tile}")
    out = weight = None
    ys, xs = _starts(height, tile, overlap), _starts(width, tile, overlap)
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            h, w = min(tile, height), min(tile, width)
            part = fn(y, x, h, w).float()
            # the real overlap with the neighbour (tiles are spread evenly, so it may be more)
            oy = (ys[i - 1] + h - y if i else 0, y + h - ys[i + 1] if i + 1 < len(ys) else 0)
            ox = (xs[j - 1] + w - x if j else 0, x + w - xs[j + 1] if j + 1 < len(xs) else 0)
            wy = torch.minimum(_ramp(h * scale, oy[0] * scale, False, True),
                               _ramp(h * scale, oy[1] * scale, True, False))
            wx = torch.minimum(_ramp(w * scale, ox[0] * scale, False, True),
                               _ramp(w * scale, ox[1] * scale, True, False))
            wt = (wy[:, None] * wx[None]).to(part.device)
            if out is None:
                out = part.new_zeros(*part.shape[:2], height * scale, width * scale)
                weight = part.new_zeros(height * scale, width * scale)
            sl = (slice(y * scale, (y + h) * scale), slice(x * scale, (x + w) * scale))
            out[(..., *sl)] += part * wt
            weight[sl] += wt
    return out / weight


@torch.no_grad()
def upscale_image(model: LatentDiffusion, low: torch.Tensor, *, prompt: str = "",
                  negative_prompt: str = "", noise_level: int = DEFAULT_NOISE_LEVEL,
                  steps: int = 20, sampler: str = "DDIM", cfg_scale: float = 9.0,
                  seed: int = 0, tile: int = 128, overlap: int = 16,
                  prompt_encoder: PromptEncoder | None = None) -> torch.Tensor:
    """Low-res images [B,3,h,w] in [-1, 1] → 4× images [B,3,4h,4w] in about [-1, 1].

    The noise (latent and augmentation) is drawn once for the whole image from `seed`, and
    each tile of at most `tile` low-res pixels crops its part, so tiles agree where they
    overlap as far as the model's context allows. The empty prompt with an empty negative
    runs without guidance (u + s·(c − u) = u)."""
    enc = prompt_encoder or X4UpscalerFamily().prompt_encoder(model, EmbeddingDB())
    c = enc.encode([prompt])[0].context
    u = enc.encode([negative_prompt])[0].context if (prompt or negative_prompt) else None
    b, _, h, w = low.shape
    g = torch.Generator().manual_seed(int(seed))
    aug = torch.randn(low.shape, generator=g)
    noise = torch.randn((b, model.config.vae.embed_dim, h, w), generator=g)

    def region(y: int, x: int, th: int, tw: int) -> torch.Tensor:
        sl = (..., slice(y, y + th), slice(x, x + tw))
        lat = upscale_latents(model, low[sl], c.expand(b, -1, -1),
                              None if u is None else u.expand(b, -1, -1), noise[sl], aug[sl],
                              noise_level=noise_level, steps=steps, sampler=sampler,
                              cfg_scale=cfg_scale, generator=g)
        return model.vae.image_from_latent(lat.to(model.dtype)).float().cpu()
    return tiled(region, h, w, tile, overlap, 4)
