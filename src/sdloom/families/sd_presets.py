"""The published U-Net family models as configs (SD 1.x, SD 2.x, SDXL base and refiner, the
inpainting variants) and sdloom's embedded model. Detection returns one of these when a file's
shapes are its shapes."""
from __future__ import annotations

import dataclasses

from ..config import ModelConfig, TextEncoderConfig, UNetConfig, VAEConfig

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
    # the shipped file's VAE scale (1 / latent std, measured by `train --vae-scale-by-std`),
    # live-preview factors (fitted by training.train.fit_latent_rgb on its VAE) and prediction
    # type, so that detection from shapes alone reproduces its stored config
    VAEConfig(ch=32, ch_mult=(1, 1, 2, 2), num_res_blocks=1, num_groups=16,
              scale_factor=0.9614258695585899,
              latent_rgb=(0.31709, -0.20972, -0.50033, 0.207, -0.04797, -0.67666, 0.01289,
                          0.09831, 0.43461, -0.31783, -0.80498, -1.32298, 0.30108, 0.42991,
                          0.71699)),
    (TextEncoderConfig(layout="hf", width=96, layers=4, heads=2, act="quick_gelu"),),
    prediction="v", default_size=128, name="embedded")
PRESETS["embedded"] = EMBEDDED
