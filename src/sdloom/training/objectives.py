"""What the trainer's denoising step differs in between model families, chosen once per run:
the objective (by the family's model sampling) and how captions become the denoiser's keyword
arguments (by whether the text encoder can train).

Objectives (`objective_for`):
- DiscreteSampling → `NoiseObjective`: t uniform in [0, T), x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε, target
  ε or v = √ᾱ_t·ε − √(1−ᾱ_t)·x0, MSE, optionally min-SNR-γ weighted (Ho et al. 2020; Salimans &
  Ho 2022; Hang et al. 2023).
- FlowSampling → `FlowObjective`: rectified flow (Esser et al. 2024). σ per image from
  logit-normal timestep sampling, u = sigmoid(n), n ~ N(0, 1) (the paper's lognorm(0, 1), §3.1,
  and diffusers' default `weighting_scheme="logit_normal"`, logit_mean 0, logit_std 1), then the
  model's shift σ = shift·u / (1 + (shift − 1)·u), as diffusers' SD3 scripts do by indexing the
  shifted scheduler table (sdloom keeps σ continuous rather than rounding u to 1/1000);
  x_t = (1 − σ)·x0 + σ·ε; the network at t = σ·1000 predicts the velocity; target ε − x0;
  MSE with uniform weighting (the sampling density is the only weighting, as the paper's
  "rf/lognorm(0.00, 1.00)").

Conditioning (`conditioning_for`): both have prepare(captions, size, device) → a dict, called
outside the trained module, and __call__(prepared) → the denoiser's keyword arguments, inside it.
- `TokenConditioning` (SD1/SD2, one CLIP): captions as CLIP ids (one 77-token chunk), encoded
  inside the trained module, so what=full trains the text encoder.
- `PromptConditioning` (frozen text encoders, e.g. SD3's CLIP-L + CLIP-G + T5): the family's
  prompt encoder over the captions as written (no emphasis syntax) under no_grad, then the
  family's cond_kwargs (SD3: context and pooled y).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import SdloomError
from ..prompts import Conditioning, EmbeddingDB
from ..sampling.model_sampling import DiscreteSampling, FlowSampling
from ..tokenizer import get_tokenizer

Denoise = Callable[..., torch.Tensor]  # net(x_t, t, **cond) → the raw prediction
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0  # SD3's logit-normal timestep density (Esser et al. 2024)


def diffusion_target(x0: torch.Tensor, noise: torch.Tensor, ac: torch.Tensor,
                     prediction: str) -> torch.Tensor:
    """ε, or v = √ᾱ·ε − √(1−ᾱ)·x0 (Salimans & Ho 2022); `ac` broadcasts over x0."""
    if prediction == "eps":
        return noise
    return ac.sqrt() * noise - (1 - ac).sqrt() * x0


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """min(SNR, γ)/SNR for ε, min(SNR, γ)/(SNR+1) for v (Hang et al. 2023, eq. 8 and app.)."""
    return snr.clamp(max=gamma) / (snr if prediction == "eps" else snr + 1)


class NoiseObjective(nn.Module):
    """ε- or v-prediction on the DDPM table: draw() gives integer timesteps."""

    def __init__(self, sampling: DiscreteSampling, min_snr_gamma: float = 0.0):
        super().__init__()
        self.prediction, self.min_snr_gamma = sampling.prediction, min_snr_gamma
        ac = sampling.schedule.alphas_cumprod.float()
        self.num_timesteps = len(ac)
        self.register_buffer("ac", ac, persistent=False)

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """t uniform in [0, T) on the CPU generator."""
        return torch.randint(0, self.num_timesteps, (n,), generator=gen)

    def forward(self, net: Denoise, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor,
                cond: dict) -> torch.Tensor:
        a = self.ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        pred = net(x_t, t, **cond).float()
        loss = (pred - diffusion_target(x0, noise, a, self.prediction)).pow(2).flatten(1).mean(1)
        if self.min_snr_gamma > 0:
            loss = loss * min_snr_weight((a / (1 - a)).flatten(), self.min_snr_gamma,
                                         self.prediction)
        return loss.mean()


class FlowObjective(nn.Module):
    """Rectified flow with logit-normal σ and the model's shift: draw() gives σ ∈ (0, 1)."""

    def __init__(self, sampling: FlowSampling, logit_mean: float = LOGIT_MEAN,
                 logit_std: float = LOGIT_STD):
        super().__init__()
        self.shift, self.multiplier = sampling.schedule.shift, sampling.multiplier
        self.logit_mean, self.logit_std = logit_mean, logit_std

    def draw(self, n: int, gen: torch.Generator) -> torch.Tensor:
        """σ = shift·u / (1 + (shift − 1)·u), u = sigmoid(N(mean, std²)), on the CPU generator."""
        u = torch.sigmoid(torch.randn(n, generator=gen) * self.logit_std + self.logit_mean)
        return self.shift * u / (1 + (self.shift - 1) * u)

    def forward(self, net: Denoise, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor,
                cond: dict) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        v = net(x_t, sigma * self.multiplier, **cond).float()
        return (v - (noise - x0)).pow(2).flatten(1).mean(1).mean()


def objective_for(sampling, min_snr_gamma: float = 0.0) -> NoiseObjective | FlowObjective:
    """The objective of a family's model sampling (`Family.model_sampling`)."""
    if isinstance(sampling, DiscreteSampling):
        return NoiseObjective(sampling, min_snr_gamma)
    if isinstance(sampling, FlowSampling):
        if min_snr_gamma > 0:
            raise SdloomError("min_snr_gamma weights the eps/v objective; rectified-flow models "
                              "(SD3) train with logit-normal timesteps and uniform weighting")
        return FlowObjective(sampling)
    raise SdloomError(f"no training objective for {type(sampling).__name__}")


class TokenConditioning:
    """One CLIP text encoder run inside the trained module (trained too when unfrozen)."""

    def __init__(self, model):
        self.encoder = model.text_encoders[0]
        self.pad = model.config.text_encoders[0].pad_token
        self.tokenizer = get_tokenizer()
        self.grad = any(p.requires_grad for p in self.encoder.parameters())

    def prepare(self, captions: list[str], size: tuple[int, int], device: torch.device) -> dict:
        """CLIP ids [B, 77]: BOS, the caption (truncated), EOS, pad."""
        return {"ids": self.tokenizer(captions, pad_token=self.pad).to(device, non_blocking=True)}

    def __call__(self, prepared: dict) -> dict[str, torch.Tensor]:
        with torch.set_grad_enabled(self.grad and torch.is_grad_enabled()):
            return {"context": self.encoder(prepared["ids"])[0]}


class PromptConditioning:
    """Frozen text encoders through the family's prompt encoder, computed before the step."""

    def __init__(self, family, model):
        self.family, self.model = family, model
        self.encoder = family.prompt_encoder(model, EmbeddingDB())
        self.encoder.emphasis = "None"  # captions are text: brackets and BREAK as written

    @torch.no_grad()
    def prepare(self, captions: list[str], size: tuple[int, int], device: torch.device) -> dict:
        """The denoiser's keyword arguments for the batch (`size` = (width, height) pixels).
        Every caption is encoded at the batch's largest chunk count (SD3: CLIP chunks padded
        with empty ones, T5 at 77·k tokens after them), as A1111 batches a prompt's texts."""
        enc = self.encoder
        k = max(len(enc.tokenize(c)) for c in captions)
        conds = enc._encode(captions, [k] * len(captions))
        c = Conditioning(torch.cat([c.context for c in conds]),
                         torch.cat([c.pooled for c in conds]))
        return self.family.cond_kwargs(self.model.config, c, size[0], size[1], 6.0, device,
                                       torch.float32)

    def __call__(self, prepared: dict) -> dict[str, torch.Tensor]:
        return prepared


def conditioning_for(family, model) -> TokenConditioning | PromptConditioning:
    """CLIP ids through the text encoder for the one-encoder SD layout (SD1/SD2, where
    what=full trains it), the family's frozen prompt encoder otherwise (SD3)."""
    if family.trains_text_encoder(model):
        return TokenConditioning(model)
    if any(p.requires_grad for p in _text_parameters(model)):
        raise SdloomError("the text encoders of this model train frozen only")
    return PromptConditioning(family, model)


def _text_parameters(model) -> list[nn.Parameter]:
    """Parameters outside the denoiser and the VAE (the text encoders)."""
    return [p for n, p in model.named_parameters()
            if not n.startswith(("model.diffusion_model.", "first_stage_model."))]
