"""Noise schedules: the model's discrete sigma table and the step schedules samplers walk.

Every schedule function returns float32 sigmas of length n+1, decreasing, ending in 0
(k-diffusion's convention). Names are A1111's ("Schedule type") with ComfyUI's extras.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import SdloomError


@dataclass(frozen=True)
class DiscreteSchedule:
    """The DDPM training process as sigmas: sigma_t = sqrt((1 - ᾱ_t) / ᾱ_t), t = 0…T-1."""
    alphas_cumprod: torch.Tensor  # float64 [T]

    @classmethod
    def scaled_linear(cls, steps: int = 1000, start: float = 0.00085,
                      end: float = 0.012) -> DiscreteSchedule:
        """LDM's "scaled linear" betas: linear in sqrt(beta)."""
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def sigmas(self) -> torch.Tensor:
        ac = self.alphas_cumprod
        return ((1 - ac) / ac).sqrt().float()

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by linear interpolation in log sigma (as k-diffusion)."""
        log_sigmas = self.log_sigmas.to(sigma.device)
        ls = sigma.float().clamp(min=1e-10).log()
        dists = ls - log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - ls) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        lo, hi = t.floor().long(), t.ceil().long()
        w = t - lo
        ls = self.log_sigmas.to(t.device)
        return ((1 - w) * ls[lo] + w * ls[hi]).exp()


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s.float(), s.new_zeros(1).float()])


def uniform(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """Timesteps evenly spaced from T-1 to 0 (k-diffusion's default discretisation)."""
    t = torch.linspace(len(sched.alphas_cumprod) - 1, 0, n)
    return _append_zero(sched.t_to_sigma(t))


def karras(n: int, sched: DiscreteSchedule, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: evenly spaced in sigma^(1/rho)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sched.sigma_min ** (1 / rho), sched.sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    return _append_zero(torch.linspace(math.log(sched.sigma_max), math.log(sched.sigma_min),
                                       n).exp())


def sgm_uniform(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """SGM/SDXL-style: n timesteps evenly spaced, the endpoint excluded."""
    t0 = sched.sigma_to_t(torch.tensor(sched.sigma_max))
    t1 = sched.sigma_to_t(torch.tensor(sched.sigma_min))
    return _append_zero(sched.t_to_sigma(torch.linspace(float(t0), float(t1), n + 1)[:-1]))


def normal(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """ComfyUI's "normal": n timesteps evenly spaced from the first to the last, inclusive."""
    t0 = sched.sigma_to_t(torch.tensor(sched.sigma_max))
    t1 = sched.sigma_to_t(torch.tensor(sched.sigma_min))
    return _append_zero(sched.t_to_sigma(torch.linspace(float(t0), float(t1), n)))


def simple(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """ComfyUI's "simple": every (T/n)-th entry of the table from the top."""
    s = sched.sigmas
    step = len(s) / n
    return _append_zero(torch.stack([s[-(1 + int(i * step))] for i in range(n)]))


def ddim_uniform(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """DDIM's uniform timesteps 1, 1+c, 1+2c, … (c = T // n), highest first (Song et al. 2021)."""
    T = len(sched.alphas_cumprod)
    c = max(T // n, 1)
    ts = torch.arange(0, T, c)[:n] + 1
    return _append_zero(sched.sigmas[ts.clamp(max=T - 1)].flip(0))


def kl_optimal(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024, "Align Your Steps" KL-optimal)."""
    w = torch.linspace(0, 1, n)
    lo, hi = math.atan(sched.sigma_min), math.atan(sched.sigma_max)
    return _append_zero(torch.tan(w * lo + (1 - w) * hi))


SCHEDULERS: dict[str, Callable[[int, DiscreteSchedule], torch.Tensor]] = {
    "uniform": uniform, "karras": karras, "exponential": exponential,
    "sgm_uniform": sgm_uniform, "simple": simple, "normal": normal,
    "ddim_uniform": ddim_uniform, "kl_optimal": kl_optimal,
}
LABELS = {"uniform": "Uniform", "karras": "Karras", "exponential": "Exponential",
          "sgm_uniform": "SGM Uniform", "simple": "Simple", "normal": "Normal",
          "ddim_uniform": "DDIM", "kl_optimal": "KL Optimal", "automatic": "Automatic"}


def scheduler_key(name: str) -> str:
    """Canonical scheduler key from an A1111 label or ComfyUI name ("SGM Uniform" → sgm_uniform)."""
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = {"ddim": "ddim_uniform", "kl": "kl_optimal"}.get(key, key)
    if key not in SCHEDULERS and key != "automatic":
        raise SdloomError(f"unknown scheduler {name!r}; choose from: automatic, "
                          + ", ".join(SCHEDULERS))
    return key


def get_sigmas(scheduler: str, steps: int, sched: DiscreteSchedule) -> torch.Tensor:
    if steps < 1:
        raise SdloomError(f"steps must be ≥ 1, got {steps}")
    return SCHEDULERS[scheduler_key(scheduler)](steps, sched)
