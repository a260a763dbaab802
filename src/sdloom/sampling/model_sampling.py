"""How a family's model is noised and denoised (ComfyUI's "model sampling", k-diffusion's
denoiser wrappers): the sigma table the schedulers read, the denoiser around the raw network,
and the noising rule that starts a pass.

- Discrete (LDM/SGM, eps or v): x = x0 + σ·ε on the DDPM table (Karras et al. 2022).
- Flow (rectified flow, SD3): x = (1 − σ)·x0 + σ·ε with σ ∈ (0, 1], shifted timesteps
  σ(s) = shift·s / (1 + (shift − 1)·s) (Esser et al. 2024, §5.3.2), the network predicting the
  velocity ε − x0 at timestep σ·1000.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .denoisers import EpsDenoiser, FlowDenoiser, VDenoiser
from .schedules import DiscreteSchedule


class DiscreteSampling:
    """eps- or v-prediction on the DDPM sigma table (VE form: x = x0 + σ·ε)."""
    noise_form = "ve"  # what samplers that re-inject noise are told (noise.NOISE_FORMS)

    def __init__(self, schedule: DiscreteSchedule, prediction: str):
        self.schedule, self.prediction = schedule, prediction

    def denoiser(self, model: Callable[..., torch.Tensor]) -> EpsDenoiser:
        return (VDenoiser if self.prediction == "v" else EpsDenoiser)(model, self.schedule)

    def noised(self, latent: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """The start of a pass at σ: x0 + σ·ε (txt2img: x0 = 0)."""
        return latent + noise * sigma


@dataclass(frozen=True)
class FlowSchedule:
    """The flow-matching sigma table with the same interface as DiscreteSchedule, so every
    scheduler works on it: entry i is σ((i + 1)/T), and t ↔ σ is exact (no interpolation)."""
    shift: float = 3.0
    num_timesteps: int = 1000
    sigmas: torch.Tensor = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "sigmas", self.t_to_sigma(torch.arange(self.num_timesteps)))

    def _shifted(self, s: torch.Tensor) -> torch.Tensor:
        return self.shift * s / (1 + (self.shift - 1) * s)

    sigma_min = DiscreteSchedule.sigma_min  # the table's ends, as on the DDPM table
    sigma_max = DiscreteSchedule.sigma_max

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self._shifted((t + 1) / self.num_timesteps).float()

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.double()
        unshifted = s / (self.shift - (self.shift - 1) * s)
        return (unshifted * self.num_timesteps - 1).float()


class FlowSampling:
    """Rectified flow (SD3): x = (1 − σ)·x0 + σ·ε, velocity prediction at t = σ·1000."""
    noise_form = "flow"  # ancestral/SDE samplers re-noise with α = 1 − σ (samplers.py)

    def __init__(self, shift: float = 3.0, multiplier: float = 1000.0):
        self.schedule = FlowSchedule(shift)
        self.multiplier = multiplier

    def denoiser(self, model: Callable[..., torch.Tensor]) -> FlowDenoiser:
        return FlowDenoiser(model, self.multiplier)

    def noised(self, latent: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
        """The start of a pass at σ: (1 − σ)·x0 + σ·ε (txt2img at σ = 1: the noise itself)."""
        return latent * (1 - sigma) + noise * sigma
