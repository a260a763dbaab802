"""Samplers as pure functions over a denoiser `denoiser(x, sigma[B], **extra_args) -> x̂0`.

The state is x in the variance-exploding parameterisation, x = x0 + σ·ε (Karras et al. 2022),
walked along a decreasing sigma schedule that ends in 0. Multistep history is a local variable.
Every sampler has the signature

    sample_<name>(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                  noise_sampler=None, eta=…, s_noise=1.0, …) -> x at sigmas[-1]

and accepts (and ignores) the options it has no use for, since callers pass A1111's request
fields (eta, s_noise) whatever the sampler. Noise comes from CPU generators — one, or one per
image — so a seed gives the same image on every device.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..errors import SdloomError
from .schedules import DiscreteSchedule, LABELS, get_sigmas, karras_sigmas, scheduler_key

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict], None]
from .noise import NoiseFn, NoiseSampler, _brownian, _renoise, ancestral_step, noise_form_of


# ---------------------------------------------------------------------- shared pieces
def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dσ of the probability-flow ODE, (x − x̂0)/σ (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def _steps(sigmas: torch.Tensor) -> list[tuple[int, float, float]]:
    s = [float(v) for v in sigmas]
    return [(i, s[i], s[i + 1]) for i in range(len(s) - 1)]


def _den(denoiser: Denoiser, x: torch.Tensor, sigma: float, extra: dict) -> torch.Tensor:
    # sigma in float32 even when x is half: σ_max = 14.6146 is 14.61 in fp16
    return denoiser(x, torch.full((x.shape[0],), sigma, device=x.device, dtype=torch.float32),
                    **extra)


def _cb(callback: Callback | None, i: int, x, sigma: float, denoised, sigma_hat=None) -> None:
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "sigma_hat": sigma_hat or sigma,
                  "denoised": denoised})


def _t(sigma: float) -> float:
    """DPM-Solver's time variable for x = x0 + σε: t = −log σ (half-log-SNR λ)."""
    return -math.log(sigma)


def _churn(x, s: float, n: int, noise: NoiseFn, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float) -> tuple[torch.Tensor, float]:
    """Karras et al. 2022, Alg. 2 lines 4–6: raise σ by γ and add the matching noise."""
    gamma = min(s_churn / n, 2 ** 0.5 - 1) if s_churn > 0 and s_tmin <= s <= s_tmax else 0.0
    if gamma == 0:
        return x, s
    s_hat = s * (gamma + 1)
    return x + noise(s, s_hat) * s_noise * math.sqrt(s_hat ** 2 - s ** 2), s_hat


# ---------------------------------------------------------------------- Euler family
@torch.no_grad()
def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                 noise_sampler=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
                 **_):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 2 with Euler steps)."""
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    n = len(sigmas) - 1
    for i, s, sn in _steps(sigmas):
        x, s_hat = _churn(x, s, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _den(denoiser, x, s_hat, extra)
        _cb(callback, i, x, s, denoised, s_hat)
        x = x + to_d(x, s_hat, denoised) * (sn - s_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None,
                           generator=None, noise_sampler=None, eta=1.0, s_noise=1.0,
                           noise_form="ve", **_):
    """Ancestral Euler: an Euler step down to σ_down, then fresh noise up to σ_next (on flow,
    ComfyUI's sample_euler_ancestral_RF)."""
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    form = noise_form_of(noise_form)
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        down, up, scale = form.ancestral(s, sn, eta)
        x = x + to_d(x, s, denoised) * (down - s)
        if sn > 0:
            x = _renoise(x, noise, s, sn, s_noise, up, scale)
    return x


@torch.no_grad()
def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                noise_sampler=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0, **_):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 2); an Euler step onto σ = 0."""
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    n = len(sigmas) - 1
    for i, s, sn in _steps(sigmas):
        x, s_hat = _churn(x, s, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _den(denoiser, x, s_hat, extra)
        _cb(callback, i, x, s, denoised, s_hat)
        d = to_d(x, s_hat, denoised)
        x_next = x + d * (sn - s_hat)
        if sn > 0:  # the trapezoid needs d at σ_next, which is undefined at σ = 0
            d_next = to_d(x_next, sn, _den(denoiser, x_next, sn, extra))
            x_next = x + (d + d_next) / 2 * (sn - s_hat)
        x = x_next
    return x


def _dpm2_step(denoiser, x, d, s: float, target: float, extra) -> torch.Tensor:
    """Midpoint step, the midpoint taken in log σ (DPM-Solver-2, Lu et al. 2022, as k-diffusion)."""
    mid = math.exp((math.log(s) + math.log(target)) / 2)
    x_mid = x + d * (mid - s)
    return x + to_d(x_mid, mid, _den(denoiser, x_mid, mid, extra)) * (target - s)


@torch.no_grad()
def sample_dpm_2(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                 noise_sampler=None, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf, s_noise=1.0,
                 **_):
    """DPM-Solver-2 in σ (Lu et al. 2022; k-diffusion sample_dpm_2); Euler onto σ = 0."""
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    n = len(sigmas) - 1
    for i, s, sn in _steps(sigmas):
        x, s_hat = _churn(x, s, n, noise, s_churn, s_tmin, s_tmax, s_noise)
        denoised = _den(denoiser, x, s_hat, extra)
        _cb(callback, i, x, s, denoised, s_hat)
        d = to_d(x, s_hat, denoised)
        x = x + d * (sn - s_hat) if sn == 0 else _dpm2_step(denoiser, x, d, s_hat, sn, extra)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None,
                           generator=None, noise_sampler=None, eta=1.0, s_noise=1.0,
                           noise_form="ve", **_):
    """DPM-Solver-2 steps down to σ_down, then ancestral noise up to σ_next."""
    # the step to σ_down solves the same ODE dx/dσ = (x − x̂0)/σ in both forms; only the
    # split (σ_down, σ_up, scale) depends on the form
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    form = noise_form_of(noise_form)
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        down, up, scale = form.ancestral(s, sn, eta)
        d = to_d(x, s, denoised)
        if down == 0:
            x = x + d * (down - s)
        else:
            x = _renoise(_dpm2_step(denoiser, x, d, s, down, extra), noise, s, sn, s_noise,
                         up, scale)
    return x


# ---------------------------------------------------------------------- linear multistep
# Gauss–Legendre nodes and weights on [−1, 1]; 3 points integrate degree ≤ 5 exactly, and an
# order-k Lagrange basis has degree k − 1, so LMS up to order 6 gets exact coefficients.
_GL_NODES = (-math.sqrt(3 / 5), 0.0, math.sqrt(3 / 5))
_GL_WEIGHTS = (5 / 9, 8 / 9, 5 / 9)


def lms_coefficient(order: int, t: Sequence[float], i: int, j: int) -> float:
    """∫_{t_i}^{t_i+1} of the Lagrange basis of node t_{i−j} (Adams–Bashforth, non-uniform grid)."""
    if order > 6:
        raise ValueError("LMS coefficients are exact up to order 6")
    a, b = t[i], t[i + 1]
    total = 0.0
    for node, weight in zip(_GL_NODES, _GL_WEIGHTS):
        tau = (b - a) / 2 * node + (a + b) / 2
        basis = 1.0
        for k in range(order):
            if k != j:
                basis *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        total += weight * basis
    return (b - a) / 2 * total


@torch.no_grad()
def sample_lms(denoiser, x, sigmas, *, extra_args=None, callback=None, order=4, **_):
    """Linear multistep in σ with Lagrange-integrated coefficients (k-diffusion sample_lms)."""
    extra = extra_args or {}
    t = [float(v) for v in sigmas]
    ds: list[torch.Tensor] = []  # newest first
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        ds = [to_d(x, s, denoised)] + ds[:order - 1]
        cur = len(ds)
        x = x + sum(lms_coefficient(cur, t, i, j) * ds[j] for j in range(cur))
    return x


# ---------------------------------------------------------------------- DPM-Solver++
@torch.no_grad()
def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, **_):
    """DPM-Solver++(2M), data prediction, multistep (Lu et al. 2022b, Alg. 2)."""
    extra = extra_args or {}
    old, h_last = None, None
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:  # the exponential integrator's step onto σ = 0 is x̂0 itself
            x = denoised
            continue
        h = _t(sn) - _t(s)
        d = denoised
        if old is not None:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sn / s) * x - math.expm1(-h) * d
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(denoiser, x, sigmas, *, extra_args=None, callback=None,
                              generator=None, noise_sampler=None, eta=1.0, s_noise=1.0,
                              noise_form="ve", **_):
    """DPM-Solver++(2S) single-step (Lu et al. 2022b, Alg. 1, r = ½) with ancestral noise;
    the step x_t = (σ_t/σ_s)·x − α_t·(e^−h − 1)·x̂0 in λ = log(α/σ) holds in either form."""
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    form = noise_form_of(noise_form)
    sigmas = form.for_lam(sigmas)
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        down, up, scale = form.ancestral(s, sn, eta)
        if down == 0:
            x = x + to_d(x, s, denoised) * (down - s)
        else:
            lam = form.lam(s)
            h = form.lam(down) - lam
            s_mid = form.sigma_at(lam + h / 2)
            x_mid = (s_mid / s) * x - (form.alpha(s_mid) * math.expm1(-h / 2)) * denoised
            x = (down / s) * x - (form.alpha(down) * math.expm1(-h)) * _den(
                denoiser, x_mid, s_mid, extra)
        if sn > 0:
            x = _renoise(x, noise, s, sn, s_noise, up, scale)
    return x


@torch.no_grad()
def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                     noise_sampler=None, eta=1.0, s_noise=1.0, r=0.5, noise_form="ve", **_):
    """DPM-Solver++ SDE, two evaluations a step (Lu et al. 2022b; k-diffusion sample_dpmpp_sde)."""
    # each sub-step is an ancestral data-prediction step; both draw from one Brownian path.
    # The steps are taken on x/α, which is in VE form at noise level σ/α = e^−λ, and scaled
    # back by α (ComfyUI's CONST branch); in the VE form α = 1 and σ/α = σ
    extra, form = extra_args or {}, noise_form_of(noise_form)
    sigmas = form.for_lam(sigmas)
    noise = noise_sampler or _brownian(x, sigmas, generator)
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = x + to_d(x, s, denoised) * (sn - s)
            continue
        t, h = form.lam(s), form.lam(sn) - form.lam(s)
        a, ve = form.alpha(s), form.ve_sigma(s)
        s_mid = form.sigma_at(t + h * r)
        a_mid = form.alpha(s_mid)
        down, up = ancestral_step(ve, form.ve_sigma(s_mid), eta)
        x_mid = (a_mid / a) * (down / ve) * x - (a_mid * math.expm1(t - _t(down))) * denoised
        x_mid = x_mid + noise(s, s_mid) * s_noise * (a_mid * up)
        denoised_mid = _den(denoiser, x_mid, s_mid, extra)
        a_next = form.alpha(sn)
        down, up = ancestral_step(ve, form.ve_sigma(sn), eta)
        fac = 1 / (2 * r)
        d = (1 - fac) * denoised + fac * denoised_mid
        x = (a_next / a) * (down / ve) * x - (a_next * math.expm1(t - _t(down))) * d
        x = x + noise(s, sn) * s_noise * (a_next * up)
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None,
                        generator=None, noise_sampler=None, eta=1.0, s_noise=1.0,
                        solver_type="midpoint", noise_form="ve", **_):
    """DPM-Solver++(2M) SDE, midpoint or Heun correction (Lu et al. 2022b; k-diffusion), in
    λ = log(α/σ) with the data terms scaled by α_next (ComfyUI's CONST branch on flow)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError("solver_type must be 'midpoint' or 'heun'")
    extra, form = extra_args or {}, noise_form_of(noise_form)
    sigmas = form.for_lam(sigmas)
    noise = noise_sampler or _brownian(x, sigmas, generator)
    old, h_last = None, None
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = denoised
            continue
        h = form.lam(sn) - form.lam(s)
        eh = eta * h
        a_next = form.alpha(sn)
        x = (sn / s) * math.exp(-eh) * x - (a_next * math.expm1(-h - eh)) * denoised
        if old is not None:
            r = h_last / h
            if solver_type == "heun":
                coef = -math.expm1(-h - eh) / (-h - eh) + 1
            else:
                coef = -0.5 * math.expm1(-h - eh)
            x = x + a_next * coef / r * (denoised - old)
        if eta:
            x = x + noise(s, sn) * sn * math.sqrt(-math.expm1(-2 * eh)) * s_noise
        old, h_last = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde_heun(denoiser, x, sigmas, **kw):
    """DPM-Solver++(2M) SDE with the Heun correction (A1111 "DPM++ 2M SDE Heun")."""
    kw.pop("solver_type", None)
    return sample_dpmpp_2m_sde(denoiser, x, sigmas, solver_type="heun", **kw)


@torch.no_grad()
def sample_dpmpp_3m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None,
                        generator=None, noise_sampler=None, eta=1.0, s_noise=1.0,
                        noise_form="ve", **_):
    """DPM-Solver++(3M) SDE (Lu et al. 2022b; k-diffusion): third-order multistep in λ, the data
    terms scaled by α_next (ComfyUI's CONST branch on flow)."""
    extra, form = extra_args or {}, noise_form_of(noise_form)
    sigmas = form.for_lam(sigmas)
    noise = noise_sampler or _brownian(x, sigmas, generator)
    d1 = d2 = None  # the previous two x̂0
    h1 = h2 = None  # the previous two step sizes in λ
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = denoised
            continue
        h = form.lam(sn) - form.lam(s)
        he = h * (eta + 1)
        a, a_next = form.alpha(s), form.alpha(sn)
        # (α_next/α)·e^−(1+η)h = (σ_next/σ)·e^−ηh
        x = (a_next / a) * math.exp(-he) * x - (a_next * math.expm1(-he)) * denoised
        phi2 = math.expm1(-he) / he + 1
        if h2 is not None:
            r0, r1 = h1 / h, h2 / h
            e0, e1 = (denoised - d1) / r0, (d1 - d2) / r1
            x = x + (a_next * phi2) * (e0 + (e0 - e1) * r0 / (r0 + r1)) \
                - (a_next * (phi2 / he - 0.5)) * (e0 - e1) / (r0 + r1)
        elif h1 is not None:
            x = x + (a_next * phi2) * (denoised - d1) / (h1 / h)
        if eta:
            x = x + noise(s, sn) * sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d2, d1 = d1, denoised
        h2, h1 = h1, h
    return x


# ---------------------------------------------------------------------- DPM-Solver (ε form)
# A1111's "DPM fast" and "DPM adaptive" are the original singlestep DPM-Solver (Lu et al. 2022,
# algorithms 1–3 and its adaptive DPM-Solver-12/23) on the noise prediction ε = (x − x̂0)/σ,
# with time t = −log σ. They use only the ends of the sigma grid: σ_max = sigmas[0] and
# σ_min = the last positive sigma (A1111 passes the model's σ range for txt2img, which is what
# its schedules' ends are, and the grid's ends for img2img). They stop at σ_min, not at 0.
class _EpsSolver:
    def __init__(self, denoiser: Denoiser, extra: dict):
        self.denoiser, self.extra, self.evals = denoiser, extra, 0

    def eps(self, x: torch.Tensor, t: float) -> torch.Tensor:
        self.evals += 1
        s = math.exp(-t)
        return (x - _den(self.denoiser, x, s, self.extra)) / s

    def first(self, x, t, t_next, e0):
        """DPM-Solver-1 (= DDIM) from t to t_next."""
        return x - math.exp(-t_next) * math.expm1(t_next - t) * e0

    def second(self, x, t, t_next, e0, r1=0.5, e1=None):
        """DPM-Solver-2 with its intermediate point at t + r1·h; returns (x, ε at that point)."""
        h = t_next - t
        if e1 is None:
            s1 = t + r1 * h
            e1 = self.eps(x - math.exp(-s1) * math.expm1(r1 * h) * e0, s1)
        sig = math.exp(-t_next)
        return x - sig * math.expm1(h) * e0 - sig / (2 * r1) * math.expm1(h) * (e1 - e0), e1

    def third(self, x, t, t_next, e0, r1=1 / 3, r2=2 / 3, e1=None):
        """DPM-Solver-3 with intermediate points at t + r1·h and t + r2·h."""
        h = t_next - t
        s1, s2 = t + r1 * h, t + r2 * h
        if e1 is None:
            e1 = self.eps(x - math.exp(-s1) * math.expm1(r1 * h) * e0, s1)
        u2 = (x - math.exp(-s2) * math.expm1(r2 * h) * e0
              - math.exp(-s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (e1 - e0))
        e2 = self.eps(u2, s2)
        sig = math.exp(-t_next)
        return x - sig * math.expm1(h) * e0 - sig / r2 * (math.expm1(h) / h - 1) * (e2 - e0)


def _dpm_range(sigmas: torch.Tensor) -> tuple[float, float, int]:
    """(σ_max, σ_min, number of steps) of a grid, σ_min being its last positive sigma."""
    s = [float(v) for v in sigmas]
    positive = [v for v in s if v > 0]
    if len(positive) < 2:
        raise ValueError("DPM fast/adaptive need a grid with two positive sigmas")
    return s[0], positive[-1], len(s) - 1


def _ancestral_target(t: float, t_next: float, t_end: float, eta: float
                      ) -> tuple[float, float]:
    """Where a DPM-Solver step with ancestral noise goes, (t of σ_down capped at t_end, σ_up)."""
    if not eta:
        return t_next, 0.0
    down, _ = ancestral_step(math.exp(-t), math.exp(-t_next), eta)
    t_down = min(t_end, -math.log(down))
    return t_down, math.sqrt(max(0.0, math.exp(-2 * t_next) - math.exp(-2 * t_down)))


def sample_dpm_fast(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                    noise_sampler=None, eta=1.0, s_noise=1.0, **_):
    """DPM-Solver-fast: as many order-3 steps as the evaluation budget (the step count) allows,
    evenly spaced in log σ, the last one or two of lower order (Lu et al. 2022, §3.4)."""
    s_max, s_min, nfe = _dpm_range(sigmas)
    solver, noise = _EpsSolver(denoiser, extra_args or {}), noise_sampler or NoiseSampler(
        x, generator)
    t_start, t_end = -math.log(s_max), -math.log(s_min)
    m = nfe // 3 + 1
    ts = [t_start + (t_end - t_start) * k / m for k in range(m + 1)]
    orders = [3] * (m - 2) + [2, 1] if nfe % 3 == 0 else [3] * (m - 1) + [nfe % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        target, up = _ancestral_target(t, t_next, t_end, eta)
        at = solver.evals
        e0 = solver.eps(x, t)
        _cb(callback, at, x, math.exp(-t), x - math.exp(-t) * e0)
        if order == 1:
            x = solver.first(x, t, target, e0)
        elif order == 2:
            x = solver.second(x, t, target, e0)[0]
        else:
            x = solver.third(x, t, target, e0)
        if up:
            x = x + noise(math.exp(-t), math.exp(-t_next)) * (s_noise * up)
    return x


def sample_dpm_adaptive(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        noise_sampler=None, eta=1.0, s_noise=1.0, order=3, rtol=0.05,
                        atol=0.0078, h_init=0.05, pcoeff=0.0, icoeff=1.0, dcoeff=0.0,
                        accept_safety=0.81, **_):
    """DPM-Solver-23 (or -12 with order=2) with an adaptive step in log σ: each step's
    lower-order solution estimates the error, a PID controller (Söderlind 2003; only its
    integral term by default) sets the next step. The number of evaluations follows from the
    tolerances, not the step count, which only scales the progress reports."""
    if order not in (2, 3):
        raise ValueError("DPM adaptive: order must be 2 or 3")
    s_max, s_min, n = _dpm_range(sigmas)
    solver, noise = _EpsSolver(denoiser, extra_args or {}), noise_sampler or NoiseSampler(
        x, generator)
    t, t_end, h = -math.log(s_max), -math.log(s_min), abs(h_init)
    k_order = 1.5 if eta else order
    b1, b2, b3 = ((pcoeff + icoeff + dcoeff) / k_order, -(pcoeff + 2 * dcoeff) / k_order,
                  dcoeff / k_order)
    inv_errs: list[float] = []
    x_prev, e0, steps = x, None, 0
    while t < t_end - 1e-5:
        t_next = min(t_end, t + h)
        target, up = _ancestral_target(t, t_next, t_end, eta)
        if e0 is None:  # a rejected step retries from the same point: its ε is still good
            e0 = solver.eps(x, t)
        if order == 2:
            x_low = solver.first(x, t, target, e0)
            x_high = solver.second(x, t, target, e0)[0]
        else:
            x_low, e1 = solver.second(x, t, target, e0, r1=1 / 3)
            x_high = solver.third(x, t, target, e0, e1=e1)
        scale = torch.maximum(torch.full_like(x_low, atol),
                              rtol * torch.maximum(x_low.abs(), x_prev.abs()))
        error = float(torch.linalg.vector_norm((x_low - x_high) / scale)) / x.numel() ** 0.5
        inv = 1 / (error + 1e-8)
        if not inv_errs:
            inv_errs = [inv, inv, inv]
        inv_errs[0] = inv
        factor = 1 + math.atan(inv_errs[0] ** b1 * inv_errs[1] ** b2 * inv_errs[2] ** b3 - 1)
        _cb(callback, min(steps, n - 1), x, math.exp(-t), x - math.exp(-t) * e0)
        steps += 1
        if factor >= accept_safety:
            inv_errs[1:] = inv_errs[:2]
            x_prev = x_low
            x = x_high
            if up:
                x = x + noise(math.exp(-t), math.exp(-t_next)) * (s_noise * up)
            t, e0 = t_next, None
        h *= factor
    return x


# ---------------------------------------------------------------------- DDIM, PLMS, UniPC, LCM
@torch.no_grad()
def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                noise_sampler=None, eta=0.0, noise_form="ve", **_):
    """DDIM (Song et al. 2021, eq. 12) in σ: the VP update on x/√(1+σ²); eta = 0 equals Euler."""
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    eta = 0.0 if eta is None else eta
    if eta and noise_form_of(noise_form).name != "ve":
        # its noise is the VE/VP form's; with eta = 0 it is Euler, which flow shares
        raise SdloomError("DDIM with eta > 0 is not defined for flow-matching models here; "
                          "use eta 0, or Euler a / DPM++ 2S a for an ancestral sampler")
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = denoised
            continue
        eps = to_d(x, s, denoised)
        a, a_next = 1 / (1 + s * s), 1 / (1 + sn * sn)  # ᾱ_t, ᾱ_{t−1}
        std = eta * math.sqrt((1 - a_next) / (1 - a) * (1 - a / a_next))
        x_vp = math.sqrt(a_next) * denoised + math.sqrt(max(1 - a_next - std ** 2, 0.0)) * eps
        if std > 0:
            x_vp = x_vp + std * noise(s, sn)
        x = x_vp / math.sqrt(a_next)
    return x


@torch.no_grad()
def sample_plms(denoiser, x, sigmas, *, extra_args=None, callback=None, **_):
    """PLMS (Liu et al. 2022, PNDM, as LDM's PLMSSampler): Adams–Bashforth on ε over DDIM steps."""
    # warm-up as LDM: a pseudo improved-Euler (trapezoid) first step, then AB2, AB3, AB4
    extra = extra_args or {}
    eps_hist: list[torch.Tensor] = []  # oldest first, at most 3
    for i, s, sn in _steps(sigmas):
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        e = to_d(x, s, denoised)  # = ε̂
        if not eps_hist and sn > 0:
            x_next = x + e * (sn - s)
            e_prime = (e + to_d(x_next, sn, _den(denoiser, x_next, sn, extra))) / 2
        elif len(eps_hist) == 1:
            e_prime = (3 * e - eps_hist[-1]) / 2
        elif len(eps_hist) == 2:
            e_prime = (23 * e - 16 * eps_hist[-1] + 5 * eps_hist[-2]) / 12
        elif len(eps_hist) == 3:
            e_prime = (55 * e - 59 * eps_hist[-1] + 37 * eps_hist[-2] - 9 * eps_hist[-3]) / 24
        else:
            e_prime = e
        eps_hist = (eps_hist + [e])[-3:]
        x = x + e_prime * (sn - s)  # the DDIM (eta = 0) step with ε′: x̂0′ + σ_next·ε′
    return x


def _unipc_update(x, ms, lams, lam_t: float, sigma_t: float, order: int, variant: str,
                  model_t=None):
    """UniP predictor (model_t None) or UniC corrector step to λ_t (Zhao et al. 2023, Alg. 2/3)."""
    # data prediction, in σ space; B(h) = h for bh1, eʰ − 1 for bh2
    m0, lam0 = ms[-1], lams[-1]
    h = lam_t - lam0
    hh = -h  # data prediction integrates e^{−λ}
    h_phi_1 = math.expm1(hh)
    b_h = hh if variant == "bh1" else math.expm1(hh)
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-1 - k] - lam0) / h
        rks.append(rk)
        d1s.append((ms[-1 - k] - m0) / rk)
    rks.append(1.0)
    # R[k][j] = r_j^k and b_k = k!·φ_{k+1}(h)/B(h): the order conditions of the UniPC paper
    R, b = [], []
    h_phi_k, fact = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    R64, b64 = torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    x_t = (sigma_t / math.exp(-lam0)) * x - h_phi_1 * m0
    if model_t is None:
        if not d1s:
            return x_t
        rhos = [0.5] if order == 2 else torch.linalg.solve(R64[:-1, :-1], b64[:-1]).tolist()
        return x_t - b_h * sum(r * d for r, d in zip(rhos, d1s))
    rhos = [0.5] if order == 1 else torch.linalg.solve(R64, b64).tolist()
    corr = sum(r * d for r, d in zip(rhos[:-1], d1s)) if d1s else 0
    return x_t - b_h * (corr + rhos[-1] * (model_t - m0))


@torch.no_grad()
def sample_unipc(denoiser, x, sigmas, *, extra_args=None, callback=None, order=2,
                 variant="bh2", **_):
    """UniPC (Zhao et al. 2023): UniP multistep predictor + UniC corrector, 1 evaluation a step."""
    # the corrector reuses the next step's model evaluation, so it costs nothing extra
    if variant not in ("bh1", "bh2") or not 1 <= order <= 3:
        raise ValueError("UniPC takes variant 'bh1' or 'bh2' and order 1, 2 or 3")
    extra = extra_args or {}
    ms: list[torch.Tensor] = []
    lams: list[float] = []
    x_prev, used = None, 1
    n = len(sigmas) - 1
    for i, s, sn in _steps(sigmas):
        m = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, m)
        if ms:  # UniC: redo the last step with the model output at its end
            x = _unipc_update(x_prev, ms, lams, _t(s), s, used, variant, model_t=m)
        ms, lams = (ms + [m])[-order:], (lams + [_t(s)])[-order:]
        if sn == 0:  # a first-order step onto σ = 0 is x̂0 (diffusers' lower_order_final)
            x = m
            continue
        used = min(order, len(ms), n - i)  # warm up, and lower the order on the last steps
        x_prev = x
        x = _unipc_update(x, ms, lams, _t(sn), sn, used, variant)
    return x


@torch.no_grad()
def sample_lcm(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
               noise_sampler=None, noise_form="ve", **_):
    """Latent consistency sampling (Luo et al. 2023): jump to x̂0, re-noise to the next σ."""
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    form = noise_form_of(noise_form)
    for i, s, sn in _steps(sigmas):
        x = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, x)
        if sn > 0:
            x = form.noised(x, noise(s, sn), sn)
    return x


@torch.no_grad()
def sample_restart(denoiser, x, sigmas, *, extra_args=None, callback=None, generator=None,
                   noise_sampler=None, s_noise=1.0, restart_list=None, **_):
    """Restart sampling (Xu et al. 2023) with A1111's defaults: Heun, restarts from σ≈0.1 to σ≈2."""
    # restart_list: {σ at which to restart: (steps + 1, times, σ to jump to)}. Without one,
    # 20+ steps give {0.1: (10, 1, 2)} and 36+ give {0.1: (steps//4 + 1, 2, 2)}; the main
    # Karras schedule gives up those steps, so len(sigmas) − 1 Heun steps are run in all.
    extra, noise = extra_args or {}, noise_sampler or NoiseSampler(x, generator)
    steps = len(sigmas) - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            k, times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = karras_sigmas(steps - k * times, float(sigmas[-2]), float(sigmas[0]))
            restart_list = {0.1: (k + 1, times, 2.0)}
    sig = [float(v) for v in sigmas]

    def nearest(v: float) -> int:
        return min(range(len(sig)), key=lambda j: abs(sig[j] - v))

    restarts = {nearest(at): spec for at, spec in restart_list.items()}
    segments: list[tuple[float, float]] = []
    for i in range(len(sig) - 1):
        segments.append((sig[i], sig[i + 1]))
        if i + 1 in restarts:
            n_restart, times, to = restarts[i + 1]
            top = nearest(to)
            if top < i + 1:
                sub = [float(v) for v in karras_sigmas(n_restart, sig[i + 1], sig[top])[:-1]]
                segments += list(zip(sub[:-1], sub[1:])) * times
    last = None
    for i, (s, sn) in enumerate(segments):
        if last is not None and last < s:  # a restart: forward-diffuse from last up to s
            x = x + noise(last, s) * s_noise * math.sqrt(s ** 2 - last ** 2)
        denoised = _den(denoiser, x, s, extra)
        _cb(callback, i, x, s, denoised)
        d = to_d(x, s, denoised)
        x_next = x + d * (sn - s)
        if sn > 0:
            d_next = to_d(x_next, sn, _den(denoiser, x_next, sn, extra))
            x_next = x + (d + d_next) / 2 * (sn - s)
        x, last = x_next, sn
    return x


# ---------------------------------------------------------------------- the table
@dataclass(frozen=True)
class SamplerSpec:
    """A sampler as A1111 lists it: name, function, and the schedule "Automatic" means for it."""
    name: str  # A1111 name, as written to infotext
    fn: Callable[..., torch.Tensor]
    scheduler: str  # the scheduler key "automatic" resolves to (A1111's options['scheduler'])
    aliases: tuple[str, ...] = ()  # A1111 k_ aliases and ComfyUI names
    stochastic: bool = False  # draws noise while sampling
    # A1111 computes steps+1 sigmas and drops the next-to-last one for these, so the last step
    # is one big jump from a moderate σ to 0 rather than a tiny step to σ_min
    discard_penultimate_sigma: bool = False
    # runs on rectified-flow models (x = (1 − σ)·x0 + σ·ε) when called with noise_form="flow":
    # every deterministic sampler (they only solve dx/dσ = (x − x̂0)/σ, the same ODE in both
    # forms) and the stochastic ones with a flow form of their noise
    flow: bool = True

    def supports(self, form: str) -> bool:
        """Whether this sampler is defined for a model whose noise form is `form`."""
        return form == "ve" or (form == "flow" and self.flow)

    def sigmas(self, scheduler: str, steps: int, schedule: DiscreteSchedule) -> torch.Tensor:
        """The sigmas A1111 would sample this sampler on: [steps + 1], ending in 0."""
        key = scheduler_key(scheduler)
        key = self.scheduler if key == "automatic" else key
        if not self.discard_penultimate_sigma:
            return get_sigmas(key, steps, schedule)
        s = get_sigmas(key, steps + 1, schedule)
        return torch.cat([s[:-2], s[-1:]])


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in [
    SamplerSpec("DPM++ 2M", sample_dpmpp_2m, "karras", ("k_dpmpp_2m", "dpmpp_2m")),
    SamplerSpec("DPM++ SDE", sample_dpmpp_sde, "karras", ("k_dpmpp_sde", "dpmpp_sde",
                                                          "dpmpp_sde_gpu"), True),
    SamplerSpec("DPM++ 2M SDE", sample_dpmpp_2m_sde, "exponential",
                ("k_dpmpp_2m_sde", "dpmpp_2m_sde", "dpmpp_2m_sde_gpu"), True),
    SamplerSpec("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde_heun, "exponential",
                ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun_gpu"), True),
    SamplerSpec("DPM++ 2S a", sample_dpmpp_2s_ancestral, "karras",
                ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), True),
    SamplerSpec("DPM++ 3M SDE", sample_dpmpp_3m_sde, "exponential",
                ("k_dpmpp_3m_sde", "dpmpp_3m_sde", "dpmpp_3m_sde_gpu"), True,
                discard_penultimate_sigma=True),
    SamplerSpec("Euler a", sample_euler_ancestral, "uniform",
                ("k_euler_a", "k_euler_ancestral", "euler_ancestral"), True),
    SamplerSpec("Euler", sample_euler, "uniform", ("k_euler", "euler")),
    SamplerSpec("LMS", sample_lms, "uniform", ("k_lms", "lms")),
    SamplerSpec("Heun", sample_heun, "uniform", ("k_heun", "heun")),
    SamplerSpec("DPM2", sample_dpm_2, "karras", ("k_dpm_2", "dpm_2"),
                discard_penultimate_sigma=True),
    SamplerSpec("DPM2 a", sample_dpm_2_ancestral, "karras", ("k_dpm_2_a", "dpm_2_ancestral"),
                True, discard_penultimate_sigma=True),
    # DPM fast/adaptive (ε-form DPM-Solver with VE ancestral noise) and Restart (VE
    # forward noising up to σ = 2) have no flow form here
    SamplerSpec("DPM fast", sample_dpm_fast, "uniform", ("k_dpm_fast", "dpm_fast"), True,
                flow=False),
    SamplerSpec("DPM adaptive", sample_dpm_adaptive, "uniform", ("k_dpm_ad", "dpm_adaptive"),
                True, flow=False),
    SamplerSpec("Restart", sample_restart, "karras", ("restart",), True, flow=False),
    SamplerSpec("DDIM", sample_ddim, "ddim_uniform", ("ddim",)),
    SamplerSpec("PLMS", sample_plms, "ddim_uniform", ("plms",)),
    SamplerSpec("UniPC", sample_unipc, "uniform", ("unipc", "uni_pc", "uni_pc_bh2")),
    SamplerSpec("LCM", sample_lcm, "sgm_uniform", ("k_lcm", "lcm"), True),
]}

_LOOKUP = {k.lower(): v for k, v in SAMPLERS.items()}
_LOOKUP.update({a.lower(): v for v in SAMPLERS.values() for a in v.aliases})
# scheduler suffixes of pre-1.9 combined names ("DPM++ 2M Karras") and of A1111's aliases
# ("k_dpmpp_2m_ka", "k_dpmpp_2m_sde_exp"), longest first so "SGM Uniform" beats "Uniform"
_SUFFIXES = sorted([(" " + label.lower(), key) for key, label in LABELS.items()]
                   + [(" " + key.replace("_", " "), key) for key in LABELS]
                   + [(" " + key, key) for key in LABELS]
                   + [("_ka", "karras"), ("_exp", "exponential")],
                   key=lambda p: -len(p[0]))


def resolve_sampler(name: str | None, scheduler: str | None = None) -> tuple[SamplerSpec, str]:
    """A1111/ComfyUI sampler name (pre-1.9 "DPM++ 2M Karras" too) → (spec, scheduler key)."""
    # case-insensitive; a combined name's suffix wins over `scheduler`, as in A1111's
    # get_sampler_and_scheduler; None or "" is A1111's API default, Euler
    key = (name or "Euler").strip().lower()
    implied = None
    if key not in _LOOKUP:
        for suffix, sch in _SUFFIXES:
            if key.endswith(suffix) and key[:-len(suffix)].strip() in _LOOKUP:
                key, implied = key[:-len(suffix)].strip(), sch
                break
    spec = _LOOKUP.get(key)
    if spec is None:
        raise SdloomError(f"unknown sampler {name!r}; choose from: " + ", ".join(SAMPLERS))
    sch = implied if implied and implied != "automatic" else scheduler_key(scheduler)
    return spec, spec.scheduler if sch == "automatic" else sch
