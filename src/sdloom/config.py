"""Frozen, typed model configs and the family presets (SD1, SD2, SDXL, inpaint variants, embedded).

Every config is plain data; each family (`families/`) detects them from tensor shapes.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

from .errors import SdloomError


@dataclass(frozen=True)
class UNetConfig:
    """LDM/SGM `UNetModel` hyper-parameters, named as in the original configs."""
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # transformer depth per resolution level; 0 = no attention at that level
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    transformer_depth_middle: int = 1  # 0 = middle block without attention (never used by SD)
    num_heads: int = 8  # used when num_head_channels == -1 (SD1)
    num_head_channels: int = -1  # fixed head width (SD2/SDXL: 64)
    context_dim: int = 768
    use_linear_in_transformer: bool = False
    adm_in_channels: int | None = None  # SDXL: pooled text + size/crop embeddings
    time_embed_mult: int = 4
    num_groups: int = 32

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer at `channels` width."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """AutoencoderKL (f = 2**(len(ch_mult)-1)) hyper-parameters."""
    in_channels: int = 3
    out_ch: int = 3
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    z_channels: int = 4
    embed_dim: int = 4
    num_groups: int = 32
    scale_factor: float = 0.18215
    shift_factor: float = 0.0
    use_quant_conv: bool = True  # False: SD3/Flux's 16-ch VAE, no quant_conv/post_quant_conv

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass(frozen=True)
class TextEncoderConfig:
    """A CLIP text transformer. layout "hf" = transformers CLIPTextModel keys (CLIP-L, as SD1/SDXL
    store it); "openclip" = open_clip keys (OpenCLIP ViT-H / bigG, as SD2/SDXL store it)."""
    layout: str = "hf"
    vocab_size: int = 49408
    max_positions: int = 77
    width: int = 768
    layers: int = 12
    heads: int = 12
    mlp_ratio: int = 4
    act: str = "quick_gelu"  # CLIP-L: quick_gelu; OpenCLIP H/bigG: gelu
    projection_dim: int | None = None  # text_projection width (pooled output), if present
    # which hidden state the U-Net sees: -1 = last (after final LN), -2 = penultimate (no final LN)
    hidden_layer: int = -1
    # SD1/SD2 pass that hidden state through the final LayerNorm; SDXL does not
    final_norm_on_hidden: bool = True
    pad_token: int = 49407  # SD1 pads with EOS; OpenCLIP pads with 0
    # "hf" takes the pooled token at argmax(ids) (SD1/SDXL CLIP-L), like transformers
    pooled: bool = False  # whether this encoder's pooled (projected) output conditions the U-Net


@dataclass(frozen=True)
class ModelConfig:
    """A whole latent diffusion model: U-Net + VAE + text encoder(s) + how they are wired."""
    family: str  # sd1 | sd2 | sdxl | sdxl-refiner | embedded
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: tuple[TextEncoderConfig, ...]
    prediction: str = "eps"  # eps | v
    default_size: int = 512
    # discrete schedule of the training process (scaled-linear betas)
    num_timesteps: int = 1000
    linear_start: float = 0.00085
    linear_end: float = 0.012
    name: str = ""  # preset name, or "" for a shape-derived custom config

    @property
    def is_inpaint(self) -> bool:
        return self.unet.in_channels == self.vae.embed_dim * 2 + 1

    @property
    def is_sdxl(self) -> bool:
        return self.unet.adm_in_channels is not None

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """A config from its `asdict` form; SdloomError naming what is missing or unknown.
        Values are not checked here: `families.sd_detect.config_problems` checks them against
        the tensors they describe."""
        def tup(x):
            return {k: tuple(v) if isinstance(v, list) else v for k, v in x.items()}
        try:
            return cls(
                **{k: v for k, v in d.items() if k not in ("unet", "vae", "text_encoders")},
                unet=UNetConfig(**tup(d["unet"])),
                vae=VAEConfig(**tup(d["vae"])),
                text_encoders=tuple(TextEncoderConfig(**tup(t)) for t in d["text_encoders"]),
            )
        except KeyError as e:
            raise SdloomError(f"model config lacks {e}") from None
        except (TypeError, AttributeError) as e:  # unknown field names, a list for a dict…
            raise SdloomError(f"invalid model config: {e}") from None

    def replace(self, **kw) -> ModelConfig:
        return dataclasses.replace(self, **kw)


CLIP_L = TextEncoderConfig(layout="hf", width=768, layers=12, heads=12, act="quick_gelu",
                           hidden_layer=-1, pad_token=49407)
OPENCLIP_H = TextEncoderConfig(layout="openclip", width=1024, layers=24, heads=16, act="gelu",
                               projection_dim=1024, hidden_layer=-2, pad_token=0)
# SDXL: CLIP-L penultimate hidden state; OpenCLIP bigG penultimate hidden + pooled projection
CLIP_L_SDXL = dataclasses.replace(CLIP_L, hidden_layer=-2, final_norm_on_hidden=False)
OPENCLIP_BIGG = TextEncoderConfig(layout="openclip", width=1280, layers=32, heads=20, act="gelu",
                                  projection_dim=1280, hidden_layer=-2, pad_token=0, pooled=True,
                                  final_norm_on_hidden=False)

VAE_SD = VAEConfig()
VAE_SDXL = VAEConfig(scale_factor=0.13025)

UNET_SD1 = UNetConfig()
UNET_SD2 = UNetConfig(num_head_channels=64, context_dim=1024, use_linear_in_transformer=True)
UNET_SDXL = UNetConfig(model_channels=320, channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10),
                       transformer_depth_middle=10, num_head_channels=64, context_dim=2048,
                       use_linear_in_transformer=True, adm_in_channels=2816)
UNET_SDXL_REFINER = UNetConfig(model_channels=384, channel_mult=(1, 2, 4, 4),
                               transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
                               num_head_channels=64, context_dim=1280,
                               use_linear_in_transformer=True, adm_in_channels=2560)


def _inpaint(u: UNetConfig) -> UNetConfig:
    return dataclasses.replace(u, in_channels=9)


PRESETS: dict[str, ModelConfig] = {
    "sd1": ModelConfig("sd1", UNET_SD1, VAE_SD, (CLIP_L,), name="sd1"),
    "sd1-inpaint": ModelConfig("sd1", _inpaint(UNET_SD1), VAE_SD, (CLIP_L,), name="sd1-inpaint"),
    "sd2-v": ModelConfig("sd2", UNET_SD2, VAE_SD, (OPENCLIP_H,), prediction="v",
                         default_size=768, name="sd2-v"),
    "sd2-inpaint": ModelConfig("sd2", _inpaint(UNET_SD2), VAE_SD, (OPENCLIP_H,),
                               name="sd2-inpaint"),
    "sdxl-base": ModelConfig("sdxl", UNET_SDXL, VAE_SDXL, (CLIP_L_SDXL, OPENCLIP_BIGG),
                             default_size=1024, name="sdxl-base"),
    "sdxl-inpaint": ModelConfig("sdxl", _inpaint(UNET_SDXL), VAE_SDXL,
                                (CLIP_L_SDXL, OPENCLIP_BIGG), default_size=1024,
                                name="sdxl-inpaint"),
    "sdxl-refiner": ModelConfig("sdxl-refiner", UNET_SDXL_REFINER, VAE_SDXL, (OPENCLIP_BIGG,),
                                default_size=1024, name="sdxl-refiner"),
}

# The embedded default model: SD1 classes and key layout at small width, trained by sdloom on
# emoji at 128×128 (16×16 latents). The text width is small because the 49408-row token table
# dominates the parameter count; the whole file stays under 25 MB in fp16.
EMBEDDED = ModelConfig(
    "sd1",
    UNetConfig(model_channels=48, channel_mult=(1, 2, 2), num_res_blocks=1,
               transformer_depth=(0, 1, 1), transformer_depth_middle=1, num_heads=4,
               context_dim=96, num_groups=16),
    # the shipped file's VAE scale (1 / latent std, measured by `train --vae-scale-by-std`) and
    # prediction type, so that detection from shapes alone reproduces its stored config
    VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, num_groups=16,
              scale_factor=0.9614258695585899),
    (TextEncoderConfig(layout="hf", width=96, layers=4, heads=2, act="quick_gelu"),),
    prediction="v", default_size=128, name="embedded")
PRESETS["embedded"] = EMBEDDED
