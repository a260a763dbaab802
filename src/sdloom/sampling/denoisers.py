"""Thin wrappers that turn a U-Net into a denoiser D(x, σ) → x̂0, classifier-free guidance over
any denoiser, and the glue that runs a named sampler (k-diffusion `external.py`; the
preconditioning is Karras et al. 2022, Table 1, with σ_data = 1 as for LDM latents).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import SdloomError
from .noise import Generators
from .samplers import Callback, resolve_sampler
from .schedules import DiscreteSchedule


class EpsDenoiser(nn.Module):
    """ε-prediction: x̂0 = x − σ·ε(x/√(σ²+1), t(σ)) (Karras et al. 2022, Table 1; k-diffusion)."""
    # `model(x_in, t, **cond)` gets the fractional timestep t(σ) from log-σ interpolation of
    # the training table, as k-diffusion, A1111 (quantization off) and diffusers' Euler/Heun/
    # LMS/KDPM2 do; on the table's own sigmas t is an integer. quantize=True rounds t to the
    # nearest entry in log σ, leaving the scalings on the true σ (k-diffusion's quantize).

    def __init__(self, model: Callable[..., torch.Tensor], schedule: DiscreteSchedule,
                 quantize: bool = False):
        super().__init__()
        self.model = model
        self.schedule = schedule
        self.quantize = quantize

    def scalings(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) for sigmas s, already shaped to broadcast over x."""
        return torch.ones_like(s), -s, 1 / (s ** 2 + 1) ** 0.5

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = sigma.float()
        t = self.schedule.sigma_to_t(sigma)
        if self.quantize:
            t = t.round()
        c_skip, c_out, c_in = self.scalings(sigma.view(-1, *[1] * (x.ndim - 1)))
        out = self.model(x * c_in.to(x.dtype), t, **cond).float()
        return x.float() * c_skip + out * c_out


class VDenoiser(EpsDenoiser):
    """v-prediction (Salimans & Ho 2022): c_skip = 1/(σ²+1), c_out = −σ/√(σ²+1)."""

    def scalings(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return 1 / (s ** 2 + 1), -s / (s ** 2 + 1) ** 0.5, 1 / (s ** 2 + 1) ** 0.5


class FlowDenoiser(nn.Module):
    """Rectified-flow velocity prediction (Esser et al. 2024): x̂0 = x − σ·v(x, σ·1000)."""

    def __init__(self, model: Callable[..., torch.Tensor], multiplier: float = 1000.0):
        super().__init__()
        self.model, self.multiplier = model, multiplier

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        sigma = sigma.float()
        s = sigma.view(-1, *[1] * (x.ndim - 1))
        v = self.model(x, sigma * self.multiplier, **cond).float()
        return x.float() - v * s


Cond = Mapping[str, object]
CondAt = Callable[[int], Cond]  # A1111's step counter → U-Net keyword arguments


def _batchable(c: Cond, u: Cond) -> bool:
    """Whether cond and uncond can share one U-Net call: same keys, tensors equal past dim 0."""
    if c.keys() != u.keys():
        return False
    return all(not isinstance(c[k], torch.Tensor)
               or (isinstance(u[k], torch.Tensor) and c[k].shape[1:] == u[k].shape[1:])
               for k in c)


def _cat(a: Cond, b: Cond) -> dict:
    return {k: torch.cat([v, b[k].to(v)]) if isinstance(v, torch.Tensor) else v
            for k, v in a.items()}


class CFGDenoiser(nn.Module):
    """Classifier-free guidance (Ho & Salimans 2022): x̂0 = u + scale·(c − u), one batched call.

    cond(step) and uncond(step) give the U-Net keyword arguments ({"context": …, "y": …}) in
    force at A1111's step counter: the number of earlier calls of this denoiser in the current
    sampling pass (A1111's CFGDenoiser.step), so prompt editing switches where A1111 switches,
    also for samplers that call the model twice per step (Heun, DPM2, DPM++ SDE). When cond and
    uncond differ in token length they run as two calls, unpadded (A1111's default,
    pad_cond_uncond off). With `groups` (AND prompts), cond holds one row per prompt part and
    groups[i] lists image i's (row, weight) pairs: x̂0ᵢ = uᵢ + scale·Σ w·(c_row − uᵢ)."""

    def __init__(self, denoiser: Callable[..., torch.Tensor], cond: CondAt, uncond: CondAt,
                 cfg_scale: float, *, groups: list[list[tuple[int, float]]] | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.cond, self.uncond = cond, uncond
        self.scale = float(cfg_scale)
        self.groups = groups
        # the image each cond row belongs to
        self.rows = None if groups is None else torch.tensor(
            [i for i, g in enumerate(groups) for _ in g])
        self.step = 0

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, **extra) -> torch.Tensor:
        step, self.step = self.step, self.step + 1
        if self.groups is not None:
            return self._composed(x, sigma, step, extra)
        cond = {**self.cond(step), **extra}
        if self.scale == 1.0:  # u + 1·(c − u) = c: the unconditional pass would be wasted
            return self.denoiser(x, sigma, **cond)
        uncond = {**self.uncond(step), **extra}
        if not _batchable(cond, uncond):  # prompts of different token lengths
            c = self.denoiser(x, sigma, **cond)
            u = self.denoiser(x, sigma, **uncond)
        else:
            c, u = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                 **_cat(cond, uncond)).chunk(2)
        return u + (c - u) * self.scale

    def _composed(self, x: torch.Tensor, sigma: torch.Tensor, step: int,
                  extra: dict) -> torch.Tensor:
        """AND prompts: every part's row and every image's uncond in one U-Net call."""
        n, rows = x.shape[0], self.rows.to(x.device)
        sigma = sigma.reshape(-1).expand(n) if sigma.numel() == 1 else sigma
        per_row = {k: v[rows] if isinstance(v, torch.Tensor) and v.shape[:1] == (n,) else v
                   for k, v in extra.items()}
        cond, uncond = {**self.cond(step), **per_row}, {**self.uncond(step), **extra}
        xc, sc = x[rows], sigma[rows]
        if _batchable(cond, uncond):
            out = self.denoiser(torch.cat([xc, x]), torch.cat([sc, sigma]), **_cat(cond, uncond))
            c, u = out[:len(rows)], out[len(rows):]
        else:
            c, u = self.denoiser(xc, sc, **cond), self.denoiser(x, sigma, **uncond)
        res = u.clone()
        for i, g in enumerate(self.groups):
            for row, w in g:
                res[i] += (c[row] - u[i]) * (w * self.scale)
        return res


def img2img_steps(steps: int, strength: float, fix_steps: bool = False) -> tuple[int, int]:
    """A1111's setup_img2img_steps → (total, t_enc): run t_enc + 1 steps of a `total` schedule."""
    # normally total = steps and t_enc = int(min(strength, 0.999)·steps); with fix_steps
    # (A1111's img2img_fix_steps option, and always for its hires pass) exactly `steps` run
    if fix_steps:
        total = int(steps / min(strength, 0.999)) if strength > 0 else 0
        return total, steps - 1
    return steps, int(min(strength, 0.999) * steps)


def sampling_sigmas(sampler_name: str | None, scheduler: str | None, steps: int,
                    schedule: DiscreteSchedule, strength: float | None = None,
                    fix_steps: bool = False) -> torch.Tensor:
    """The sigmas a pass samples, as A1111: the whole schedule for txt2img; for img2img
    (`strength` given) the tail sigmas[total − t_enc − 1:] of a `total`-step schedule
    (sd_samplers_kdiffusion.sample_img2img), t_enc + 1 steps."""
    spec, sched = resolve_sampler(sampler_name, scheduler)
    if strength is None:
        return spec.sigmas(sched, steps, schedule)
    total, t_enc = img2img_steps(steps, strength, fix_steps)
    return spec.sigmas(sched, total, schedule)[total - t_enc - 1:]


def sample(sampler_name: str | None, scheduler: str | None,
           denoiser: Callable[..., torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor, *,
           generator: Generators = None, extra_args: dict | None = None,
           callback: Callback | None = None, eta: float | None = None,
           s_noise: float | None = None, noise_form: str = "ve") -> torch.Tensor:
    """Run a named A1111 sampler on x (already noised to sigmas[0]) down to sigmas[-1];
    `noise_form` is the model sampling's ("ve" or "flow"), for samplers that add noise."""
    spec, _ = resolve_sampler(sampler_name, scheduler)
    if not spec.supports(noise_form):
        raise SdloomError(f"sampler {spec.name!r} is not defined for {noise_form} models; "
                          "choose another (e.g. Euler, Euler a, DPM++ 2M, DPM++ 2M SDE)")
    opts = {k: v for k, v in (("eta", eta), ("s_noise", s_noise)) if v is not None}
    return spec.fn(denoiser, x, sigmas.to(x.device), extra_args=extra_args, callback=callback,
                   generator=generator, noise_form=noise_form, **opts)
