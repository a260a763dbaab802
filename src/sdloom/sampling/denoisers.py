"""Thin wrappers that turn a U-Net into a denoiser `D(x, sigma) -> x̂0`, and classifier-free
guidance over any denoiser (k-diffusion `external.py`; Karras et al. 2022, Table 1)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .schedules import DiscreteSchedule


class EpsDenoiser(nn.Module):
    """ε-prediction: x̂0 = x − σ·ε(x·c_in, t(σ)), c_in = 1/√(σ²+1)."""

    def __init__(self, model: nn.Module, schedule: DiscreteSchedule):
        super().__init__()
        self.model = model
        self.schedule = schedule

    def scalings(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for sigmas `s` already shaped to broadcast over x."""
        return torch.ones_like(s), -s, 1 / (s ** 2 + 1) ** 0.5

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        c_skip, c_out, c_in = self.scalings(sigma.float().view(-1, *[1] * (x.ndim - 1)))
        t = self.schedule.sigma_to_t(sigma.float())  # fractional timesteps, as k-diffusion
        out = self.model(x * c_in.to(x.dtype), t, **cond).float()
        return x.float() * c_skip + out * c_out


class VDenoiser(EpsDenoiser):
    """v-prediction (Salimans & Ho 2022): c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1)."""

    def scalings(self, s):
        return 1 / (s ** 2 + 1), -s / (s ** 2 + 1) ** 0.5, 1 / (s ** 2 + 1) ** 0.5


CondFn = Callable[[torch.Tensor], tuple[dict, dict]]


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): uncond + scale·(cond − uncond), with cond
    and uncond in one batch. `conds(sigma)` gives (cond kwargs, uncond kwargs) for this step,
    which is how prompt editing switches prompts mid-way."""

    def __init__(self, denoiser: nn.Module, conds: CondFn | tuple[dict, dict], scale: float):
        super().__init__()
        self.denoiser = denoiser
        self.conds = conds if callable(conds) else (lambda _s, c=conds: c)
        self.scale = scale

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        cond, uncond = self.conds(sigma)
        if self.scale == 1.0:  # guidance off: the unconditional pass would be wasted
            return self.denoiser(x, sigma, **cond, **extra)
        kw = {}
        for k in cond:
            c, u = cond[k], uncond[k]
            kw[k] = torch.cat([u, c]) if isinstance(c, torch.Tensor) else c
        for k, v in extra.items():
            kw[k] = torch.cat([v, v]) if isinstance(v, torch.Tensor) else v
        out = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **kw)
        u, c = out.chunk(2)
        return u + (c - u) * self.scale


def sigmas_for_img2img(sigmas: torch.Tensor, strength: float, steps: int) -> torch.Tensor:
    """A1111 img2img: t_enc = int(min(strength, 0.999)·steps); sample sigmas[steps − t_enc − 1:]."""
    t_enc = int(min(strength, 0.999) * steps)
    return sigmas[steps - t_enc - 1:]
