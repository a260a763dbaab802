"""Frozen, typed configs of the U-Net families' building blocks and of a whole SD model; the
presets of published models are in `families/sd_presets.py`.

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
    num_classes: int | None = None  # class-label embedding `label_emb` (x4: the noise level)
    # per level: whether attn1 attends to the text context instead of the image (LDM's
    # disable_self_attentions; the x4 upscaler's first levels); None = self-attention everywhere
    disable_self_attentions: tuple[bool, ...] | None = None
    # False: LDM's legacy `AttentionBlock` (self-attention only, fused per-head qkv, no text)
    # where the transformer would be; transformer_depth then only says where attention is (LDSR)
    use_spatial_transformer: bool = True

    def heads_for(self, channels: int) -> tuple[int, int]:
        """(heads, head_dim) of a transformer at `channels` width."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels, self.num_head_channels
        return self.num_heads, channels // self.num_heads


@dataclass(frozen=True)
class VAEConfig:
    """First-stage autoencoder (f = 2**(len(ch_mult)-1)) hyper-parameters: AutoencoderKL, or
    with `n_embed` codes a VQModel (LDM's vq-f4/vq-f8: `double_z` off, a vector quantiser)."""
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
    n_embed: int = 0  # codebook size of a VQ autoencoder; 0 = KL autoencoder
    # resolution levels (ch_mult indices) whose blocks have self-attention (LDM's
    # attn_resolutions, as levels: vq-f8's [32] at 256 px is level 3); the SD VAEs have none
    attn_levels: tuple[int, ...] = ()
    # latent → RGB for the live preview (A1111's "Approx cheap"): (embed_dim + 1) × 3 numbers,
    # row-major, one row per latent channel of the diffusion latent, then a bias row; fitted
    # when sdloom trains a VAE (training.train.fit_latent_rgb). Empty: the family's factors
    latent_rgb: tuple[float, ...] = ()

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
