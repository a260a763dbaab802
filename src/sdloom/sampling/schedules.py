"""Noise schedules: the model's discrete sigma table and the step schedules samplers walk.

Every schedule returns float32 sigmas of length n+1, strictly decreasing, ending in 0
(k-diffusion's convention). Scheduler names are A1111's "Schedule type" keys; labels and
ComfyUI spellings are accepted by `scheduler_key`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..errors import SdloomError


@dataclass(frozen=True)
class DiscreteSchedule:
    """The DDPM training process as sigmas: σ_t = √((1 − ᾱ_t)/ᾱ_t), t = 0…T−1 (Ho et al. 2020)."""
    alphas_cumprod: torch.Tensor  # float64 [T]
    sigmas: torch.Tensor = field(init=False, repr=False, compare=False)  # float32 [T], ascending
    log_sigmas: torch.Tensor = field(init=False, repr=False, compare=False)
    _on_device: dict = field(init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self):
        ac = self.alphas_cumprod.double().cpu()
        # float32 like the LDM buffers k-diffusion reads, so sigma_min/max match A1111 bit for bit
        sigmas = ((1 - ac) / ac).sqrt().float()
        object.__setattr__(self, "sigmas", sigmas)
        object.__setattr__(self, "log_sigmas", sigmas.log())

    @classmethod
    def scaled_linear(cls, steps: int = 1000, start: float = 0.00085,
                      end: float = 0.012) -> DiscreteSchedule:
        """LDM's "scaled linear" betas: evenly spaced in √β (Rombach et al. 2022)."""
        betas = torch.linspace(start ** 0.5, end ** 0.5, steps, dtype=torch.float64) ** 2
        return cls(torch.cumprod(1.0 - betas, dim=0))

    @property
    def num_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def _log_sigmas(self, device: torch.device) -> torch.Tensor:
        # cached per device: the denoiser maps sigma → t on every model call
        key = str(device)
        if key not in self._on_device:
            self._on_device[key] = self.log_sigmas.to(device)
        return self._on_device[key]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep by linear interpolation in log σ (k-diffusion DiscreteSchedule)."""
        log_sigmas = self._log_sigmas(sigma.device)
        ls = sigma.float().clamp(min=1e-10).log().flatten()
        # index of the last table entry ≤ log σ, kept one below the top so low+1 exists
        low = (ls[None] >= log_sigmas[:, None]).sum(0).sub(1).clamp(0, len(log_sigmas) - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - ls) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * (low + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """σ at fractional timestep t, interpolating log σ between table entries."""
        t = torch.as_tensor(t).float()
        ls = self._log_sigmas(t.device)
        lo = t.floor().long().clamp(0, len(ls) - 1)
        hi = t.ceil().long().clamp(0, len(ls) - 1)
        w = t - t.floor()
        return ((1 - w) * ls[lo] + w * ls[hi]).exp()


def _append_zero(s: torch.Tensor) -> torch.Tensor:
    return torch.cat([s.float(), s.new_zeros(1).float()])


# ---------------------------------------------------------------------- model-free schedules
def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n sigmas evenly spaced in σ^(1/ρ), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas evenly spaced in log σ (k-diffusion get_sigmas_exponential), then 0."""
    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n,
                                       dtype=torch.float64).exp())


# ---------------------------------------------------------------------- schedulers
def uniform(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """Timesteps evenly spaced from T−1 to 0, inclusive (k-diffusion's default discretisation)."""
    t = torch.linspace(sched.num_timesteps - 1, 0, n)
    return _append_zero(sched.t_to_sigma(t))


def karras(n: int, sched: DiscreteSchedule, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. 2022 between the model's σ_min and σ_max."""
    return karras_sigmas(n, sched.sigma_min, sched.sigma_max, rho)


def exponential(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """Evenly spaced in log σ between the model's σ_min and σ_max."""
    return exponential_sigmas(n, sched.sigma_min, sched.sigma_max)


def _t_range(sched: DiscreteSchedule) -> tuple[float, float]:
    t = sched.sigma_to_t(torch.tensor([sched.sigma_max, sched.sigma_min]))
    return float(t[0]), float(t[1])


def sgm_uniform(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """SGM (SDXL) discretisation: n+1 timesteps evenly spaced, the last (t = 0) dropped."""
    t0, t1 = _t_range(sched)
    return _append_zero(sched.t_to_sigma(torch.linspace(t0, t1, n + 1)[:-1]))


def normal(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """A1111/ComfyUI "normal": n timesteps evenly spaced from the top to t = 0, inclusive."""
    t0, t1 = _t_range(sched)
    return _append_zero(sched.t_to_sigma(torch.linspace(t0, t1, n)))


def simple(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """ComfyUI's "simple": every (T/n)-th entry of the table, from the top."""
    s, step = sched.sigmas, sched.num_timesteps / n
    return _append_zero(torch.stack([s[-(1 + int(i * step))] for i in range(n)]))


def ddim_uniform(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """DDIM's timesteps 1, 1+c, 1+2c, … (c = T // n), highest first (Song et al. 2021)."""
    # exactly n of them: A1111's `ddim` scheduler keeps every 1+kc < T, n+1 steps whenever
    # T mod n ≥ n−1 (31 for 30 steps); we keep the step count the user asked for
    T = sched.num_timesteps
    c = max(T // n, 1)
    ts = (torch.arange(n) * c + 1).clamp(max=T - 1)
    return _append_zero(sched.sigmas[ts].flip(0))


def kl_optimal(n: int, sched: DiscreteSchedule) -> torch.Tensor:
    """Evenly spaced in arctan σ (Sabour et al. 2024, "Align Your Steps", KL-optimal)."""
    # ends σ_min, 0 as ComfyUI's does; A1111's stops at σ_min with no final zero
    w = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = math.atan(sched.sigma_min), math.atan(sched.sigma_max)
    return _append_zero(torch.tan(w * lo + (1 - w) * hi))


def _betainc(x: float, a: float, b: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (DLMF 8.17.22), Lentz."""
    if x <= 0 or x >= 1:
        return min(max(x, 0.0), 1.0)
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast only below the mean
        return 1.0 - _betainc(1 - x, b, a)
    front = math.exp(a * math.log(x) + b * math.log1p(-x)
                     + math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)) / a
    tiny = 1e-300
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1 + num * d
        d = 1 / (d if abs(d) > tiny else tiny)
        c = 1 + num / c
        c = c if abs(c) > tiny else tiny
        f *= c * d
        if abs(1 - c * d) < 1e-15:
            break
    return front * (f - 1)


def _beta_ppf(q: float, a: float, b: float) -> float:
    """Inverse of I_x(a, b) by bisection (monotone in x, so 60 halvings reach float precision)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _betainc(mid, a, b) < q else (lo, mid)
    return (lo + hi) / 2


def beta(n: int, sched: DiscreteSchedule, alpha: float = 0.6, beta_: float = 0.6
         ) -> torch.Tensor:
    """A1111's "beta" schedule (Lee et al. 2024, "Beta Sampling is All You Need")."""
    # σ is linear in the Beta(α, β) quantile of evenly spaced levels, so steps crowd at both
    # ends; α = β = 0.6 are A1111's defaults. (ComfyUI's "beta" maps quantiles to timesteps.)
    qs = [1 - i / (n - 1) for i in range(n)] if n > 1 else [1.0]
    lo, hi = sched.sigma_min, sched.sigma_max
    return _append_zero(torch.tensor([lo + _beta_ppf(q, alpha, beta_) * (hi - lo)
                                      for q in qs], dtype=torch.float64))


SCHEDULERS: dict[str, Callable[[int, DiscreteSchedule], torch.Tensor]] = {
    "uniform": uniform, "karras": karras, "exponential": exponential,
    "sgm_uniform": sgm_uniform, "simple": simple, "normal": normal,
    "ddim_uniform": ddim_uniform, "kl_optimal": kl_optimal, "beta": beta,
}
LABELS = {"automatic": "Automatic", "uniform": "Uniform", "karras": "Karras",
          "exponential": "Exponential", "sgm_uniform": "SGM Uniform", "simple": "Simple",
          "normal": "Normal", "ddim_uniform": "DDIM", "kl_optimal": "KL Optimal",
          "beta": "Beta"}
# other spellings: A1111's internal names and aliases, ComfyUI's "ddim_uniform" is ours already
_SPELLINGS = {"ddim": "ddim_uniform", "sgmuniform": "sgm_uniform", "kl": "kl_optimal"}


def scheduler_key(name: str | None) -> str:
    """Canonical key from an A1111 label or name or a ComfyUI name ("SGM Uniform" → sgm_uniform)."""
    # None or "" is "automatic": the sampler's own default, resolved by resolve_sampler
    if not name or not name.strip():
        return "automatic"
    key = name.strip().lower().replace(" ", "_").replace("-", "_")
    key = _SPELLINGS.get(key, key)
    if key not in SCHEDULERS and key != "automatic":
        raise SdloomError(f"unknown scheduler {name!r}; choose from: "
                          + ", ".join(LABELS[k] for k in LABELS))
    return key


def scheduler_label(key: str) -> str:
    """The A1111 label written to infotext ("Schedule type: Karras")."""
    return LABELS[scheduler_key(key)]


def get_sigmas(scheduler: str, steps: int, schedule: DiscreteSchedule) -> torch.Tensor:
    """float32 sigmas [steps + 1] for a named scheduler, ending in 0."""
    key = scheduler_key(scheduler)
    if key == "automatic":
        raise SdloomError("scheduler 'automatic' depends on the sampler; resolve it with "
                          "resolve_sampler() first")
    if steps < 1:
        raise SdloomError(f"steps must be at least 1, got {steps}")
    return SCHEDULERS[key](steps, schedule).float()
