"""SD3 and SD3.5 (medium, large): an MMDiT denoiser, CLIP-L + CLIP-G + T5-XXL text encoders, a
16-channel VAE without quant convs and rectified-flow sampling with shift 3 (Esser et al. 2024).

Single files: `model.diffusion_model.*` (MMDiT, models/mmdit.py), `first_stage_model.*` (the
VAE in LDM names), `text_encoders.{clip_l,clip_g,t5xxl}.transformer.*` (transformers layouts).
Diffusers folders (StableDiffusion3Pipeline): transformer/, vae/, text_encoder[_2,_3]/,
tokenizer[_2,_3]/, scheduler/. Conditioning follows A1111 1.10 (`sd3_conditioning.py`).
"""
from __future__ import annotations

import dataclasses
import json
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .keymaps.mmdit import (mmdit_config_from_diffusers, mmdit_config_to_diffusers,
                                         mmdit_diffusers_to_original, mmdit_original_to_diffusers)
from .keymaps.vae import vae_diffusers_to_ldm, vae_ldm_to_diffusers
from ..config import TextEncoderConfig, VAEConfig
from ..errors import ModelFileError, SdloomError
from ..models.mmdit import MMDiT, MMDiTConfig
from ..models.t5 import T5Config
from ..models.vae import AutoencoderKL
from ..prompts import Conditioning, EmbeddingDB
from ..sampling.model_sampling import FlowSampling
from ..sd3_conditioning import T5_ALIAS, SD3PromptEncoder, SD3TextEncoders
from ..tokenizer import get_tokenizer
from .base import (ComponentMerge, ComponentReader, DetectionError, Family, JsonReader,
                   LatentFormat, Shapes, StateDict, short_repr)
from .sd import DiffusionWrapper
from .sd_detect import VAE_NOT_IN_SHAPES, detect_vae
from .sd_diffusers import (_text_json, _vae_json, check_folder, mapped,
                           vae_config_from_diffusers, write_clip_tokenizer)

DIT = "model.diffusion_model."
VAE = "first_stage_model."
TEXT = "text_encoders."
CLAIM_KEY = DIT + "joint_blocks.0.context_block.adaLN_modulation.1.bias"
VAE_SCALE, VAE_SHIFT = 1.5305, 0.0609  # SD3's latent normalisation: z = (x − shift)·scale
# latent → RGB in [-1, 1] for the live preview (ComfyUI latent_formats.SD3), rows = channels
SD3_RGB = ((-0.0922, -0.0175, 0.0749), (0.0311, 0.0633, 0.0954), (0.1994, 0.0927, 0.0458),
           (0.0856, 0.0339, 0.0902), (0.0587, 0.0272, -0.0496), (-0.0006, 0.1104, 0.0309),
           (0.0978, 0.0306, 0.0427), (-0.0042, 0.1038, 0.1358), (-0.0194, 0.0020, 0.0669),
           (-0.0488, 0.0130, -0.0268), (0.0922, 0.0988, 0.0951), (-0.0278, 0.0524, -0.0542),
           (0.0332, 0.0456, 0.0895), (-0.0069, -0.0030, -0.0810), (-0.0596, -0.0465, -0.0293),
           (-0.1448, -0.1463, -0.1189))
SD3_RGB_BIAS = (0.2394, 0.2135, 0.1925)


@dataclass(frozen=True)
class SD3Config:
    """A whole SD3/SD3.5 model."""
    family: str  # "sd3" (SD3 and SD3.5 share everything but shapes)
    mmdit: MMDiTConfig
    vae: VAEConfig
    clip_l: TextEncoderConfig
    clip_g: TextEncoderConfig
    t5: T5Config | None  # None: no T5 in the file; its part of the context is zeros
    shift: float = 3.0  # flow-matching timestep shift
    default_size: int = 1024
    name: str = ""  # "sd3-medium", "sd3.5-medium", "sd3.5-large", or "" for other shapes

    is_inpaint = False

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    def replace(self, **kw) -> SD3Config:
        return dataclasses.replace(self, **kw)


def _tuples(d: dict) -> dict:
    return {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}


def _mmdit_shapes(m: MMDiTConfig) -> dict[str, tuple[int, ...]]:
    """The tensor shapes an MMDiT config gives (on the meta device: no memory)."""
    if m.depth > 200 or m.hidden_size > 16384 or m.pos_embed_max_size > 1024:
        raise ModelFileError(f"MMDiT config out of range: {short_repr(m)}")
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in MMDiT(m).state_dict().items()}


def _preset_name(m: MMDiTConfig) -> str:
    """The published model these shapes are, by depth, width and position table."""
    table = {(24, 1536, 192, False, ()): "sd3-medium",
             (24, 1536, 384, True, tuple(range(13))): "sd3.5-medium",
             (38, 2432, 192, True, ()): "sd3.5-large"}
    return table.get((m.depth, m.hidden_size, m.pos_embed_max_size, m.qk_norm,
                      m.dual_attention_layers), "")


class SD3Model(nn.Module):
    """MMDiT + 16-channel VAE + SD3's text encoders, keys as in the single files."""

    def __init__(self, config: SD3Config):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(MMDiT(config.mmdit))
        self.first_stage_model = AutoencoderKL(config.vae)
        self.text_encoders = SD3TextEncoders(config.clip_l, config.clip_g, config.t5)

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def component_params(self) -> dict[str, int]:
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        out = {"mmdit": count(self.model), "vae": count(self.vae),
               "clip_l": count(self.text_encoders.clip_l),
               "clip_g": count(self.text_encoders.clip_g)}
        if self.text_encoders.t5xxl is not None:
            out["t5xxl"] = count(self.text_encoders.t5xxl)
        return out


class SD3Family(Family):
    names = ("sd3",)
    pipeline_classes = ("StableDiffusion3Pipeline", "StableDiffusion3Img2ImgPipeline",
                        "StableDiffusion3InpaintPipeline")

    # ---------------------------------------------------------------- files
    def claims(self, shapes: Shapes) -> bool:
        return CLAIM_KEY in shapes

    def detect(self, shapes: Shapes, mmdit: MMDiTConfig | None = None) -> SD3Config:
        """The config from shapes; `mmdit` given (a diffusers config) where shapes cannot say
        all (the head width of models without qk-norm: 64 assumed)."""
        mm = mmdit or MMDiTConfig.detect({k[len(DIT):]: v for k, v in shapes.items()
                                          if k.startswith(DIT)})
        # the VAE's shapes are LDM's; SD3's normalisation is a convention of the family
        vae = dataclasses.replace(detect_vae(shapes), scale_factor=VAE_SCALE,
                                  shift_factor=VAE_SHIFT)
        text = {k[len(TEXT):]: tuple(v) for k, v in shapes.items() if k.startswith(TEXT)}
        if not text:
            raise DetectionError("this SD3 file holds no text encoders (text_encoders.clip_l, "
                                 "clip_g, t5xxl): give them as separate files with "
                                 "--text-encoders clip_l.safetensors clip_g.safetensors "
                                 "[t5xxl_fp16.safetensors] (or a folder of them; library: "
                                 "text_encoders=[...]), or use a file that includes them "
                                 "(*_incl_clips*) or a diffusers folder")
        clip_l, clip_g, t5 = SD3TextEncoders.detect(text)
        return SD3Config("sd3", mm, vae, clip_l, clip_g, t5, name=_preset_name(mm))

    def config_from_dict(self, d: dict) -> SD3Config:
        try:
            t5 = d.get("t5")
            return SD3Config(
                family=d["family"], mmdit=MMDiTConfig(**_tuples(d["mmdit"])),
                vae=VAEConfig(**_tuples(d["vae"])),
                clip_l=TextEncoderConfig(**_tuples(d["clip_l"])),
                clip_g=TextEncoderConfig(**_tuples(d["clip_g"])),
                t5=T5Config(**t5) if t5 else None,
                **{k: d[k] for k in ("shift", "default_size", "name") if k in d})
        except (KeyError, TypeError) as e:
            raise ModelFileError(f"SD3 config: missing or unknown field ({e})") from None

    def config_problems(self, cfg: SD3Config, shapes: Shapes) -> list[str]:
        try:
            got = self.detect(shapes, cfg.mmdit)
            MMDiT_shapes = {k[len(DIT):]: tuple(v) for k, v in shapes.items()
                            if k.startswith(DIT)}
            want = _mmdit_shapes(cfg.mmdit)
        except (ModelFileError, ValueError, TypeError) as e:
            return [str(e)]
        if want != MMDiT_shapes:
            diff = sorted(set(want.items()) ^ set(MMDiT_shapes.items()))[:2]
            return [f"mmdit: the config does not give the file's tensor shapes ({diff})"]
        problems = []
        for part in ("mmdit", "clip_l", "clip_g", "t5"):
            if getattr(cfg, part) != getattr(got, part):
                problems.append(f"{part} is {short_repr(getattr(cfg, part))} in the metadata, "
                                f"{short_repr(getattr(got, part))} in the tensors")
        for f in dataclasses.fields(cfg.vae):
            a, b = getattr(cfg.vae, f.name), getattr(got.vae, f.name)
            if f.name not in VAE_NOT_IN_SHAPES and a != b:
                problems.append(f"vae.{f.name} is {short_repr(a)} in the metadata, "
                                f"{short_repr(b)} in the tensors")
        if not 0 < cfg.shift <= 100 or not 64 <= cfg.default_size <= 8192:
            problems.append(f"shift {short_repr(cfg.shift)} or default_size "
                            f"{short_repr(cfg.default_size)} out of range")
        return problems

    def build(self, cfg: SD3Config) -> SD3Model:
        return SD3Model(cfg)

    def optional_keys(self, model: SD3Model) -> set[str]:
        # CLIP-L's projection is unused (A1111 pools it unprojected), and some files omit it
        return {TEXT + "clip_l.transformer.text_projection.weight"}

    def without(self, cfg: SD3Config, parts: Sequence[str]) -> tuple[SD3Config, tuple[str, ...]]:
        """"t5": leave T5-XXL out (A1111's sd3_enable_t5 off): its context part is zeros."""
        unknown = set(parts) - {"t5"}
        if unknown:
            raise SdloomError(f"SD3 models can leave out t5, not {', '.join(sorted(unknown))}")
        return cfg.replace(t5=None), (TEXT + "t5xxl.",)

    def key_aliases(self, shapes: Shapes) -> dict[str, str | None]:
        # transformers' tied copy of T5's token table: read as `shared` when that is absent
        alias = TEXT + T5_ALIAS
        if alias not in shapes:
            return {}
        shared = TEXT + "t5xxl.transformer.shared.weight"
        return {alias: None} if shared in shapes else {alias: shared}

    def merge_component_files(self, shapes: Shapes, files: Sequence[tuple[str, Shapes]]
                              ) -> ComponentMerge:
        """Text encoders given as separate files (A1111's and ComfyUI's clip_l, clip_g,
        t5xxl_fp16 / t5xxl_fp8_e4m3fn): transformers layouts with or without a prefix such as
        `transformer.`. Which file is which is read from shapes, never from file names: T5 by
        `encoder.block`, the two CLIPs by width (CLIP-L is the narrower: 768 vs 1280; the
        MMDiT's pooled input is their sum). A given encoder replaces the file's own of the same
        kind (as --vae replaces the VAE), so an *_incl_clips* file takes a T5 file; T5 may be
        missing (its part of the context is zeros), CLIP-L and CLIP-G may not."""
        found = [_text_encoder_file(name, sh) for name, sh in files]
        t5s = [i for i, f in enumerate(found) if f.kind == "t5"]
        clips = sorted((i for i, f in enumerate(found) if f.kind == "clip"),
                       key=lambda i: found[i].width)
        if len(t5s) > 1:
            raise ModelFileError("more than one T5 file given: "
                                 + ", ".join(files[i][0] for i in t5s) + "; give one")
        if len(clips) > 2:
            raise ModelFileError("more than two CLIP files given: "
                                 + ", ".join(files[i][0] for i in clips)
                                 + "; SD3 takes one CLIP-L and one CLIP-G")
        own = {enc: tuple(shapes[k])[1] for enc in ("clip_l", "clip_g")
               if len(shapes.get(k := f"{TEXT}{enc}.transformer.{_CLIP_EMBED}", ())) == 2}
        pooled = shapes.get(DIT + "y_embedder.mlp.0.weight", ())
        role: dict[str, int] = {}
        if len(clips) == 2:
            if found[clips[0]].width == found[clips[1]].width:
                raise ModelFileError(
                    f"{files[clips[0]][0]} and {files[clips[1]][0]} are CLIPs of the same width "
                    f"{found[clips[0]].width}: SD3 takes CLIP-L (768 wide) and CLIP-G (1280)")
            role = {"clip_l": clips[0], "clip_g": clips[1]}
        elif clips:
            w = found[clips[0]].width
            if own.get("clip_l") == w or ("clip_g" in own and own["clip_g"] != w):
                enc = "clip_l"
            elif "clip_g" in own or "clip_l" in own:
                enc = "clip_g"
            elif len(pooled) == 2:  # neither in the file: the pooled width is L + G, L narrower
                enc = "clip_l" if w < pooled[1] - w else "clip_g"
            else:
                enc = "clip_l" if w <= 768 else "clip_g"
            role = {enc: clips[0]}
        if t5s:
            role["t5xxl"] = t5s[0]
        widths = {enc: found[i].width for enc, i in role.items()}
        for enc, label, file in (("clip_l", "CLIP-L", "clip_l.safetensors (768 wide, 12 layers)"),
                                 ("clip_g", "CLIP-G", "clip_g.safetensors (1280 wide, 32 layers, "
                                                      "with text_projection)")):
            if enc not in role and enc not in own:
                raise ModelFileError(
                    f"the {label} text encoder is missing: this SD3 file holds none and no "
                    f"file given is one: add {file} to the text encoder files")
            if enc not in widths:
                widths[enc] = own[enc]
        if len(pooled) == 2 and widths["clip_l"] + widths["clip_g"] != pooled[1]:
            raise ModelFileError(
                f"CLIP-L ({widths['clip_l']} wide) + CLIP-G ({widths['clip_g']} wide) do not give "
                f"the MMDiT's pooled input of {pooled[1]}: these text encoders are not this "
                "model's")
        context = shapes.get(DIT + "context_embedder.weight", ())
        if "t5xxl" in widths and len(context) == 2 and widths["t5xxl"] != context[1]:
            raise ModelFileError(f"{files[t5s[0]][0]}: T5 is {widths['t5xxl']} wide, the MMDiT "
                                 f"takes a context of {context[1]}: not this model's T5")
        renames = [{} for _ in files]
        for enc, i in role.items():
            renames[i] = found[i].renames(f"{TEXT}{enc}.transformer.")
        return ComponentMerge(tuple(f"{TEXT}{enc}." for enc in role), tuple(renames))

    def config_with_components(self, cfg: SD3Config, shapes: Shapes) -> SD3Config:
        # the text encoders came from the given files: their configs are those files' shapes
        text = {k[len(TEXT):]: tuple(v) for k, v in shapes.items() if k.startswith(TEXT)}
        clip_l, clip_g, t5 = SD3TextEncoders.detect(text)
        return cfg.replace(clip_l=clip_l, clip_g=clip_g, t5=t5)

    def open_diffusers(self, name: str, component: ComponentReader, json_of: JsonReader
                       ) -> tuple[SD3Config, StateDict]:
        where = f"diffusers folder {name}"
        mm = mmdit_config_from_diffusers(json_of("transformer/config.json"))
        sd = {DIT + k: v for k, v in mapped(where + "/transformer", mmdit_diffusers_to_original,
                                             component("transformer")).items()}
        sd.update({VAE + k: v for k, v in mapped(where + "/vae", vae_diffusers_to_ldm,
                                                  component("vae")).items()})
        for sub, enc in (("text_encoder", "clip_l"), ("text_encoder_2", "clip_g"),
                         ("text_encoder_3", "t5xxl")):
            if not component.has(sub):
                if enc == "t5xxl":
                    continue  # a folder without T5: its part of the context is zeros
                raise ModelFileError(f"{where} has no {sub}/")
            w = component(sub)
            if enc == "t5xxl":
                w.pop("encoder.embed_tokens.weight", None)  # the tied copy of `shared`
            sd.update({f"{TEXT}{enc}.transformer.{k}": v for k, v in w.items()
                       if not k.endswith("position_ids")})
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        cfg = self.detect(shapes, mm)
        check_folder(where, self.config_problems(cfg, shapes))
        vae = vae_config_from_diffusers(json_of("vae/config.json"), sdxl=False)
        cfg = cfg.replace(vae=dataclasses.replace(  # groups are not in the shapes
            vae, scale_factor=vae.scale_factor if vae.shift_factor else VAE_SCALE,
            shift_factor=vae.shift_factor or VAE_SHIFT))
        sched = (json_of("scheduler/scheduler_config.json") if component.has("scheduler")
                 else {})
        return cfg.replace(shift=float(sched.get("shift", 3.0))), sd

    def save_diffusers(self, cfg: SD3Config, get: Callable[[str], torch.Tensor],
                       keys: Sequence[str], folder: Path,
                       save_tensors: Callable[[StateDict, Path], None]) -> None:
        take = lambda p: {k[len(p):]: get(k) for k in keys if k.startswith(p)}  # noqa: E731

        def write(sub: str, name: str, sd: dict, config: dict) -> None:
            save_tensors(sd, folder / sub / name)
            (folder / sub / "config.json").write_text(json.dumps(config, indent=2))

        latent = cfg.default_size // cfg.vae.downscale
        write("transformer", "diffusion_pytorch_model.safetensors",
              mmdit_original_to_diffusers(take(DIT)), mmdit_config_to_diffusers(cfg.mmdit, latent)
              | {"_class_name": "SD3Transformer2DModel"})
        write("vae", "diffusion_pytorch_model.safetensors", vae_ldm_to_diffusers(take(VAE)),
              _vae_json(cfg.vae, cfg.default_size))
        index: dict = {"_class_name": "StableDiffusion3Pipeline",
                       "transformer": ["diffusers", "SD3Transformer2DModel"],
                       "vae": ["diffusers", "AutoencoderKL"],
                       "image_encoder": [None, None], "feature_extractor": [None, None]}
        for i, (enc, te) in enumerate((("clip_l", cfg.clip_l), ("clip_g", cfg.clip_g))):
            sub, tok = ("text_encoder", "tokenizer") if i == 0 else \
                ("text_encoder_2", "tokenizer_2")
            sd = take(f"{TEXT}{enc}.transformer.")
            # diffusers reads both CLIPs with a projection; CLIP-L's is identity in SD3 files
            sd.setdefault("text_projection.weight", torch.eye(te.width))
            config = _text_json(dataclasses.replace(te, projection_dim=te.projection_dim
                                                    or te.width), te.layers)
            config["architectures"] = ["CLIPTextModelWithProjection"]
            write(sub, "model.safetensors", sd, config)
            write_clip_tokenizer(folder / tok, te)
            index[sub] = ["transformers", "CLIPTextModelWithProjection"]
            index[tok] = ["transformers", "CLIPTokenizer"]
        if cfg.t5 is not None:
            t5 = cfg.t5
            sd = take(f"{TEXT}t5xxl.transformer.")
            write("text_encoder_3", "model.safetensors", sd, {
                "architectures": ["T5EncoderModel"], "model_type": "t5", "d_model": t5.d_model,
                "d_kv": t5.d_kv, "d_ff": t5.d_ff, "num_layers": t5.num_layers,
                "num_heads": t5.num_heads, "vocab_size": t5.vocab_size,
                "relative_attention_num_buckets": t5.relative_attention_num_buckets,
                "relative_attention_max_distance": t5.relative_attention_max_distance,
                "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
                "is_gated_act": True, "layer_norm_epsilon": t5.layer_norm_epsilon,
                "dropout_rate": 0.0, "pad_token_id": 0, "eos_token_id": 1,
                "tie_word_embeddings": False})
            _write_t5_tokenizer(folder / "tokenizer_3")
            index["text_encoder_3"] = ["transformers", "T5EncoderModel"]
            index["tokenizer_3"] = ["transformers", "T5TokenizerFast"]
        else:
            index["text_encoder_3"] = index["tokenizer_3"] = [None, None]
        (folder / "scheduler").mkdir(parents=True, exist_ok=True)
        (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(
            {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000,
             "shift": cfg.shift}, indent=2))
        index["scheduler"] = ["diffusers", "FlowMatchEulerDiscreteScheduler"]
        (folder / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True))

    def describe(self, cfg: SD3Config) -> list[tuple[str, str]]:
        m = cfg.mmdit
        return [("denoiser", f"MMDiT {m.depth} blocks, width {m.hidden_size}, "
                             f"{m.num_heads} heads" + (", qk-norm" if m.qk_norm else "")
                 + (f", dual attention in {len(m.dual_attention_layers)} blocks"
                    if m.dual_attention_layers else "")),
                ("sampling", f"rectified flow, shift {cfg.shift:g}"),
                ("native size", f"{cfg.default_size}x{cfg.default_size}"),
                ("text", "CLIP-L, CLIP-G" + (", T5-XXL" if cfg.t5 else " (no T5: zeros)"))]

    # ---------------------------------------------------------------- running
    def latent_format(self, cfg: SD3Config) -> LatentFormat:
        v = cfg.vae
        return LatentFormat(v.embed_dim, v.downscale, v.scale_factor, v.shift_factor)

    def size_multiple(self, cfg: SD3Config) -> int:
        return cfg.vae.downscale * cfg.mmdit.patch_size  # latents are cut in 2×2 patches

    def preview_factors(self, cfg: SD3Config) -> tuple[torch.Tensor, torch.Tensor] | None:
        """ComfyUI's SD3 latent → RGB factors and bias (latent_formats.SD3)."""
        if cfg.vae.embed_dim != len(SD3_RGB):
            return None
        return torch.tensor(SD3_RGB), torch.tensor(SD3_RGB_BIAS)

    def model_sampling(self, cfg: SD3Config) -> FlowSampling:
        return FlowSampling(cfg.shift)

    def denoiser_model(self, model: SD3Model) -> nn.Module:
        return model.model.diffusion_model

    def prompt_encoder(self, model: SD3Model, embeddings: EmbeddingDB) -> SD3PromptEncoder:
        return SD3PromptEncoder(get_tokenizer(), model.text_encoders, embeddings=embeddings,
                                context_dim=model.config.mmdit.context_dim)

    def cond_kwargs(self, cfg: SD3Config, c: Conditioning, width: int, height: int,
                    aesthetic_score: float, device: torch.device, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
        return {"context": c.context.to(device, dtype), "y": c.pooled.to(device, dtype)}

    def training_refusal(self, cfg: SD3Config, what: str) -> str | None:
        """`what=unet` trains the MMDiT (rectified flow, text encoders frozen), `what=lora`
        LoRA adapters on the MMDiT (the same objective; kohya `lora_unet_` file), `what=vae` the
        16-channel VAE (a KL autoencoder like SD's); the rest is refused."""
        if what in ("unet", "lora", "vae"):
            return None
        if what == "full":
            return ("SD3 models train with their text encoders frozen: what=unet trains the "
                    "MMDiT (the denoiser), what=lora LoRA on it, what=vae the VAE; what=full is "
                    "not supported")
        return (f"what={what} is not supported for SD3 models (what=unet fine-tunes the whole "
                "MMDiT, what=lora trains LoRA on it)")

    def lora_train_targets(self, cfg: SD3Config) -> tuple[str, ...]:
        from .sd3_lora import MMDIT_TARGETS
        return MMDIT_TARGETS

    def kohya_base_version(self, cfg: SD3Config) -> str:
        from .sd3_lora import mmdit_model_version
        return mmdit_model_version(cfg.mmdit)

    def lora_targets(self, model: SD3Model) -> dict:
        from .sd3_lora import lora_targets  # kohya and diffusers/PEFT names (sd3_lora.py)
        return lora_targets(model)


_CLIP_EMBED = "text_model.embeddings.token_embedding.weight"
_T5_BLOCK = "encoder.block.0.layer.0.SelfAttention.q.weight"
# in the file's own names: transformers ≥ 5 saves CLIPTextModel without `text_model.`
_BARE_CLIP = ("embeddings.", "encoder.", "final_layer_norm.")
# tensors inference never reads: buffers, a whole CLIPModel's image tower, a whole T5's decoder
_UNUSED = re.compile(r"(^|\.)(position_ids|logit_scale)$"
                     r"|^(vision_model|visual_projection|decoder|lm_head)(\.|$)")


@dataclass(frozen=True)
class _TextEncoderFile:
    """One separate text-encoder file: kind ("clip" | "t5"), width, and where its keys sit."""
    kind: str
    width: int
    prefix: str  # e.g. "" or "transformer.", before `text_model.` (CLIP) / `encoder.` (T5)
    bare: bool  # CLIP keys without `text_model.`
    keys: tuple[str, ...]
    name: str

    def renames(self, to: str) -> dict[str, str]:
        """File key → model key under `to` (`text_encoders.<enc>.transformer.`)."""
        out = {}
        keys = set(self.keys)
        for k in self.keys:
            rest = k[len(self.prefix):] if k.startswith(self.prefix) else None
            if _UNUSED.search(k) or (rest is not None and _UNUSED.search(rest)):
                continue
            if rest is None:
                raise ModelFileError(f"{self.name}: key {k!r} is outside the text encoder "
                                     f"(its keys start with {self.prefix!r})")
            if self.bare and rest.startswith(_BARE_CLIP):
                rest = "text_model." + rest
            if self.kind == "t5" and rest == "encoder.embed_tokens.weight":
                if self.prefix + "shared.weight" in keys:
                    continue  # transformers' tied copy of `shared`
                rest = "shared.weight"
            out[k] = to + rest
        return out


def _text_encoder_file(name: str, shapes: Shapes) -> _TextEncoderFile:
    """Which text encoder a separate file holds, from its key names and shapes."""
    if "scaled_fp8" in shapes or any(k.endswith((".scale_weight", ".scale_input"))
                                     for k in shapes):
        raise ModelFileError(f"{name}: a scaled fp8 file (ComfyUI `scaled_fp8`): its weights "
                             "need per-tensor scales sdloom does not apply; use the fp16 or the "
                             "plain fp8_e4m3fn file")

    def prefixes(anchor: str) -> list[str]:
        return [k[:-len(anchor)] for k in shapes
                if k.endswith(anchor) and (k == anchor or k[-len(anchor) - 1] == ".")]

    kinds = []
    for p in prefixes(_T5_BLOCK):
        kinds.append(("t5", p, False))
    clip = prefixes(_CLIP_EMBED)
    for p in clip:
        kinds.append(("clip", p, False))
    bare = "embeddings.token_embedding.weight"
    for p in prefixes(bare):
        if not any(p == c + "text_model." for c in clip):
            kinds.append(("clip", p, True))
    if not kinds:
        raise ModelFileError(f"{name}: not a text encoder SD3 uses (CLIP-L, CLIP-G or T5-XXL in "
                             "transformers' layout): no `encoder.block` (T5) or "
                             "`text_model.embeddings` (CLIP) tensors")
    if len(kinds) > 1:
        raise ModelFileError(f"{name}: holds {len(kinds)} text encoders (under "
                             + ", ".join(repr(p) for _, p, _ in kinds) + "); give one per file")
    kind, prefix, is_bare = kinds[0]
    if kind == "t5":
        width = tuple(shapes[prefix + _T5_BLOCK])[1]
    else:
        emb = tuple(shapes[prefix + ("" if is_bare else "text_model.") + bare])
        if len(emb) != 2:
            raise ModelFileError(f"{name}: CLIP token embedding of shape {list(emb)}")
        width = emb[1]
    return _TextEncoderFile(kind, width, prefix, is_bare, tuple(shapes), name)


def _write_t5_tokenizer(folder: Path) -> None:
    """T5TokenizerFast files: the tokenizer.json sdloom reads, and its special tokens."""
    from ..t5_tokenizer import find_tokenizer_json
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(find_tokenizer_json(), folder / "tokenizer.json")
    specials = {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}
    (folder / "special_tokens_map.json").write_text(json.dumps(specials, indent=2))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "T5TokenizerFast", "model_max_length": 512,
         "extra_ids": 100, **specials}, indent=2))
