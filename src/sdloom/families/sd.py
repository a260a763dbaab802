"""The U-Net families: SD 1.x, SD 2.x (eps and v), SDXL base and refiner, their inpainting
variants and sdloom's embedded model. One place for what they are: the whole model (its
`state_dict()` keys the single-file keys), detection (`sd_detect.py`), diffusers folders
(`sd_diffusers.py`), conditioning, noising and latents.

SD1/SD2: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`.
SDXL:    `model.diffusion_model.*`, `first_stage_model.*`, `conditioner.embedders.{i}.*`.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ModelFileError, SdloomError
from ..models.text_encoders import build_text_encoder
from ..models.unet import UNetModel, sdxl_adm
from ..models.vae import AutoencoderKL
from ..prompts import Conditioning, EmbeddingDB, PromptEncoder
from ..sampling.model_sampling import DiscreteSampling
from ..sampling.schedules import DiscreteSchedule
from ..tokenizer import get_tokenizer
from .base import ComponentReader, Family, JsonReader, LatentFormat, Shapes, StateDict
from .sd_detect import UNET, config_problems, detect
from .sd_diffusers import open_sd_diffusers, save_sd_diffusers
from .sd_lora import UNET_TARGETS, lora_targets


class DiffusionWrapper(nn.Module):
    def __init__(self, unet: UNetModel):
        super().__init__()
        self.diffusion_model = unet


class Conditioner(nn.Module):
    """SGM's `GeneralConditioner`: the text embedders of SDXL, in checkpoint order."""

    def __init__(self, embedders: list[nn.Module]):
        super().__init__()
        self.embedders = nn.ModuleList(embedders)


class LatentDiffusion(nn.Module):
    """U-Net + VAE + text encoder(s) of one Stable Diffusion family member."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = DiffusionWrapper(UNetModel(config.unet))
        self.first_stage_model = AutoencoderKL(config.vae)
        encoders = [build_text_encoder(c) for c in config.text_encoders]
        if config.is_sdxl:
            self.conditioner = Conditioner(encoders)
        else:
            if len(encoders) != 1:
                raise ModelFileError(f"an {config.family} model has exactly one text encoder, "
                                     f"this config has {len(encoders)}")
            self.cond_stage_model = encoders[0]

    @property
    def unet(self) -> UNetModel:
        return self.model.diffusion_model

    @property
    def vae(self) -> AutoencoderKL:
        return self.first_stage_model

    @property
    def text_encoders(self) -> list[nn.Module]:
        if self.config.is_sdxl:
            return list(self.conditioner.embedders)
        return [self.cond_stage_model]

    def text_encoder_prefixes(self) -> list[str]:
        if self.config.is_sdxl:
            return [f"conditioner.embedders.{i}." for i in range(len(self.config.text_encoders))]
        return ["cond_stage_model."]

    def component_params(self) -> dict[str, int]:
        """Parameter counts per component (for `sdloom info`)."""
        counts = {"unet": sum(p.numel() for p in self.unet.parameters()),
                  "vae": sum(p.numel() for p in self.vae.parameters())}
        for i, te in enumerate(self.text_encoders):
            counts[f"text_encoder{'' if i == 0 else f'_{i + 1}'}"] = sum(
                p.numel() for p in te.parameters())
        return counts

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype


class UNetAdapter(nn.Module):
    """Adds inpainting's concatenated channels (mask + masked-image latent) to the U-Net input."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, x, t, context, y=None, c_concat=None):
        if c_concat is not None:
            x = torch.cat([x, c_concat.to(x.dtype)], dim=1)
        return self.unet(x, t, context, y=y)


# latent → RGB in [-1, 1] (A1111 sd_vae_approx.cheap_approximation), rows = latent channels
SD_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264),
          (-0.184, -0.271, -0.473))
SDXL_RGB = ((0.3448, 0.4168, 0.4395), (-0.1953, -0.0290, 0.0250), (0.1074, 0.0886, -0.0163),
            (-0.3730, -0.2499, -0.2088))


class SDFamily(Family):
    """SD1, SD2, SDXL (+ refiner, inpaint) and the embedded model."""
    names = ("sd1", "sd2", "sdxl", "sdxl-refiner")
    pipeline_classes = ("StableDiffusionPipeline", "StableDiffusionInpaintPipeline",
                        "StableDiffusionXLPipeline", "StableDiffusionXLInpaintPipeline",
                        "StableDiffusionXLImg2ImgPipeline")

    def claims(self, shapes: Shapes) -> bool:
        return any(k.startswith(UNET + "input_blocks.") for k in shapes)

    # the module's own functions (Family documents each)
    detect = staticmethod(detect)
    config_from_dict = staticmethod(ModelConfig.from_dict)
    config_problems = staticmethod(config_problems)
    build = staticmethod(LatentDiffusion)

    def optional_keys(self, model: LatentDiffusion) -> set[str]:
        """Logit scales, and projections that nothing reads."""
        out = set()
        for prefix, te in zip(model.text_encoder_prefixes(), model.config.text_encoders):
            out.add(prefix + "model.logit_scale")
            if not te.pooled:
                out.add(prefix + "model.text_projection")
        return out

    def open_diffusers(self, name: str, component: ComponentReader, json_of: JsonReader
                       ) -> tuple[ModelConfig, StateDict]:
        return open_sd_diffusers(name, component, json_of)

    def save_diffusers(self, cfg: ModelConfig, get: Callable[[str], torch.Tensor],
                       keys: Sequence[str], folder: Path,
                       save_tensors: Callable[[StateDict, Path], None]) -> None:
        save_sd_diffusers(cfg, get, keys, folder, save_tensors)

    def describe(self, cfg: ModelConfig) -> list[tuple[str, str]]:
        out = [("prediction", cfg.prediction), ("inpainting", "yes" if cfg.is_inpaint else "no"),
               ("native size", f"{cfg.default_size}x{cfg.default_size}")]
        for i, te in enumerate(cfg.text_encoders):
            out.append((f"text enc {i}", f"{te.layout} width {te.width}, {te.layers} layers, "
                        f"hidden layer {te.hidden_layer}" + (", pooled" if te.pooled else "")))
        return out

    def latent_format(self, cfg: ModelConfig) -> LatentFormat:
        v = cfg.vae
        return LatentFormat(v.embed_dim, v.downscale, v.scale_factor, v.shift_factor)

    def model_sampling(self, cfg: ModelConfig) -> DiscreteSampling:
        schedule = DiscreteSchedule.scaled_linear(cfg.num_timesteps, cfg.linear_start,
                                                  cfg.linear_end)
        return DiscreteSampling(schedule, cfg.prediction)

    def denoiser_model(self, model: LatentDiffusion) -> nn.Module:
        return UNetAdapter(model.unet)

    def control_base(self, cfg: ModelConfig):
        return cfg.unet

    def controlled_model(self, model: LatentDiffusion, control) -> nn.Module:
        """denoiser_model with ControlNet residuals (sd_controlnet.ControlSet) added."""
        from .sd_controlnet import ControlledUNet
        return ControlledUNet(model.unet, control)

    def ip_adapted_model(self, model: LatentDiffusion, inner: nn.Module, units, fraction,
                         pass_mark: bool) -> nn.Module:
        """A denoiser model (denoiser_model or controlled_model) whose U-Net cross-attentions
        also attend to IP-Adapter image tokens (models.ip_adapter.ActiveIPAdapter units)."""
        from ..models.ip_adapter import IPAdaptedModel
        return IPAdaptedModel(inner, model.unet, units, fraction, pass_mark)

    def reference_model(self, model: LatentDiffusion, inner: nn.Module, units, fraction,
                        generator: torch.Generator, pass_mark: bool) -> nn.Module:
        """A denoiser model steered by reference images (models.reference.ActiveReference
        units); its write passes run the plain U-Net."""
        from ..models.reference import ReferenceModel
        return ReferenceModel(inner, UNetAdapter(model.unet), model.unet, units, fraction,
                              self.model_sampling(model.config).schedule.alphas_cumprod,
                              generator, pass_mark, model.config.is_sdxl)

    def prompt_encoder(self, model: LatentDiffusion, embeddings: EmbeddingDB) -> PromptEncoder:
        return PromptEncoder(get_tokenizer(), model.text_encoders,
                             list(model.config.text_encoders), embeddings)

    def cond_kwargs(self, cfg: ModelConfig, c: Conditioning, width: int, height: int,
                    aesthetic_score: float, device: torch.device, dtype: torch.dtype
                    ) -> dict[str, torch.Tensor]:
        """context, and SDXL's ADM vector y (pooled text + size, crop and, for the refiner,
        the aesthetic score)."""
        out = {"context": c.context.to(device, dtype)}
        if cfg.is_sdxl:
            if c.pooled is None:
                raise SdloomError("SDXL needs a pooled text embedding; the text encoder gave none")
            refiner = cfg.family == "sdxl-refiner"
            out["y"] = sdxl_adm(c.pooled.to(device, dtype), (height, width), (0, 0),
                                (height, width), aesthetic_score if refiner else None)
        return out

    def training_refusal(self, cfg: ModelConfig, what: str) -> str | None:
        if cfg.is_sdxl:
            return "training SDXL models is not supported (SD1/SD2-style models only)"
        if cfg.is_inpaint and what != "vae":
            return "training inpainting U-Nets is not supported"
        return None

    def lora_train_targets(self, cfg: ModelConfig) -> tuple[str, ...]:
        return UNET_TARGETS

    def kohya_base_version(self, cfg: ModelConfig) -> str:
        return {"sd1": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}.get(cfg.family,
                                                                             cfg.family)

    def trains_text_encoder(self, model: LatentDiffusion) -> bool:
        return len(model.text_encoders) == 1  # SD1/SD2's one CLIP (SDXL is refused above)

    def lora_targets(self, model: LatentDiffusion) -> dict:
        return lora_targets(model)

    def inpaint_channels(self, cfg: ModelConfig) -> bool:
        return cfg.is_inpaint

    def preview_factors(self, cfg: ModelConfig
                        ) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The factors fitted for this model's own VAE when sdloom trained it (the embedded
        model's), else A1111's Approx cheap factors: SDXL's for SDXL VAEs, SD1's (shared by
        SD2); none for a VAE of our own without fitted factors."""
        if cfg.vae.latent_rgb:
            m = torch.tensor(cfg.vae.latent_rgb).view(-1, 3)
            return m[:-1], m[-1]
        if cfg.name == "embedded" or cfg.vae.embed_dim != 4:
            return None
        return torch.tensor(SDXL_RGB if cfg.is_sdxl else SD_RGB), None
