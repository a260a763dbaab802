"""Samplers as pure functions over a denoiser `denoiser(x, sigma[B], **extra) -> x̂0`.

The state is x in the variance-exploding parameterisation (x = x0 + sigma·eps, Karras et al.
2022); multistep history lives in local variables. Noise comes from a CPU torch.Generator, so a
seed gives the same image on every device.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import SdloomError
from .schedules import LABELS, scheduler_key

Denoiser = Callable[..., torch.Tensor]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma of the probability-flow ODE."""
    return (x - denoised) / sigma


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """Split a step into a deterministic part down to sigma_down and fresh noise sigma_up."""
    if not eta or not sigma_next:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                         / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


class Noise:
    """Standard normal noise like x, drawn on the CPU from a seeded generator."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = torch.randn(x.shape, generator=self.generator, dtype=torch.float32)
        return n.to(x.device, x.dtype)


class BrownianNoise:
    """Increments of one Brownian path W(sigma), normalised: (W(b) − W(a)) / √|b − a|.

    Points are sampled on first use, by a Brownian bridge between known neighbours, from a
    seeded CPU generator: overlapping sub-steps (DPM++ SDE) get correlated noise, as with
    k-diffusion's Brownian tree, and a seed reproduces the path."""

    def __init__(self, generator: torch.Generator | None):
        self.generator = generator
        self.points: dict[float, torch.Tensor] = {}

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        return torch.randn(like.shape, generator=self.generator, dtype=torch.float32)

    def _at(self, t: float, like: torch.Tensor) -> torch.Tensor:
        if t in self.points:
            return self.points[t]
        if not self.points:
            w = torch.zeros(like.shape)
        else:
            lo = max((k for k in self.points if k < t), default=None)
            hi = min((k for k in self.points if k > t), default=None)
            if lo is not None and hi is not None:  # Brownian bridge
                a = (t - lo) / (hi - lo)
                mean = self.points[lo] + a * (self.points[hi] - self.points[lo])
                w = mean + self._randn(like) * math.sqrt(a * (1 - a) * (hi - lo))
            else:
                ref = lo if lo is not None else hi
                w = self.points[ref] + self._randn(like) * math.sqrt(abs(t - ref))
        self.points[t] = w
        return w

    def __call__(self, x: torch.Tensor, a: float, b: float) -> torch.Tensor:
        wa, wb = self._at(a, x), self._at(b, x)
        return ((wb - wa) / math.sqrt(abs(b - a))).to(x.device, x.dtype)


def _loop(sigmas: torch.Tensor):
    s = [float(v) for v in sigmas]
    return [(i, s[i], s[i + 1]) for i in range(len(s) - 1)]


def _call(den, x, sigma: float, extra):
    return den(x, x.new_full((x.shape[0],), sigma), **extra)


def _cb(callback, i, x, sigma, denoised):
    if callback is not None:
        callback({"i": i, "x": x, "sigma": sigma, "denoised": denoised})


def sample_euler(den, x, sigmas, *, extra_args=None, callback=None, generator=None, **_):
    """Euler's method on the probability-flow ODE (Karras et al. 2022, Alg. 1 without churn)."""
    extra = extra_args or {}
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        x = x + to_d(x, s, denoised) * (sn - s)
    return x


def sample_euler_ancestral(den, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, s_noise=1.0, **_):
    """Euler steps down to sigma_down, then fresh noise up to sigma_next."""
    extra, noise = extra_args or {}, Noise(generator)
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        down, up = ancestral_step(s, sn, eta)
        x = x + to_d(x, s, denoised) * (down - s)
        if sn > 0 and up > 0:
            x = x + noise(x) * s_noise * up
    return x


def sample_heun(den, x, sigmas, *, extra_args=None, callback=None, generator=None, **_):
    """Heun's 2nd-order method (Karras et al. 2022, Alg. 1); Euler on the last step."""
    extra = extra_args or {}
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        d = to_d(x, s, denoised)
        if sn == 0:
            x = x + d * (sn - s)
            continue
        x2 = x + d * (sn - s)
        d2 = to_d(x2, sn, _call(den, x2, sn, extra))
        x = x + (d + d2) / 2 * (sn - s)
    return x


def _dpm2_step(den, x, d, s, target, extra):
    mid = math.exp((math.log(s) + math.log(target)) / 2)
    x2 = x + d * (mid - s)
    d2 = to_d(x2, mid, _call(den, x2, mid, extra))
    return x + d2 * (target - s)


def sample_dpm_2(den, x, sigmas, *, extra_args=None, callback=None, generator=None, **_):
    """DPM-Solver-2 as in k-diffusion: midpoint in log sigma (Lu et al. 2022)."""
    extra = extra_args or {}
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        d = to_d(x, s, denoised)
        x = x + d * (sn - s) if sn == 0 else _dpm2_step(den, x, d, s, sn, extra)
    return x


def sample_dpm_2_ancestral(den, x, sigmas, *, extra_args=None, callback=None, generator=None,
                           eta=1.0, s_noise=1.0, **_):
    extra, noise = extra_args or {}, Noise(generator)
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        down, up = ancestral_step(s, sn, eta)
        d = to_d(x, s, denoised)
        x = x + d * (down - s) if down == 0 else _dpm2_step(den, x, d, s, down, extra)
        if sn > 0 and up > 0:
            x = x + noise(x) * s_noise * up
    return x


def lms_coefficient(order: int, t: list[float], i: int, j: int) -> float:
    """∫ over [t_i, t_{i+1}] of the Lagrange basis polynomial of node t_{i-j} (Gauss-Legendre)."""
    nodes, weights = np.polynomial.legendre.leggauss(8)  # exact for these low degrees
    a, b = t[i], t[i + 1]
    tau = (b - a) / 2 * nodes + (a + b) / 2
    basis = np.ones_like(tau)
    for k in range(order):
        if k != j:
            basis *= (tau - t[i - k]) / (t[i - j] - t[i - k])
    return float((b - a) / 2 * (weights * basis).sum())


def sample_lms(den, x, sigmas, *, extra_args=None, callback=None, generator=None, order=4, **_):
    """Linear multistep (Adams–Bashforth in sigma) with Lagrange-integrated coefficients."""
    extra = extra_args or {}
    t = [float(v) for v in sigmas]
    ds: list[torch.Tensor] = []
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        ds.insert(0, to_d(x, s, denoised))
        del ds[order:]
        cur = min(i + 1, order)
        x = x + sum(lms_coefficient(cur, t, i, j) * ds[j] for j in range(cur))
    return x


def _t(sigma: float) -> float:
    return -math.log(sigma)


def sample_dpmpp_2m(den, x, sigmas, *, extra_args=None, callback=None, generator=None, **_):
    """DPM-Solver++(2M) (Lu et al. 2022b), data prediction, multistep."""
    extra = extra_args or {}
    old, h_last = None, None
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = denoised
            break
        h = _t(sn) - _t(s)
        if old is None:
            d = denoised
        else:
            r = h_last / h
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (sn / s) * x - math.expm1(-h) * d
        old, h_last = denoised, h
    return x


def sample_dpmpp_2s_ancestral(den, x, sigmas, *, extra_args=None, callback=None,
                              generator=None, eta=1.0, s_noise=1.0, **_):
    """DPM-Solver++(2S) single-step with ancestral noise."""
    extra, noise = extra_args or {}, Noise(generator)
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        down, up = ancestral_step(s, sn, eta)
        if down == 0:
            x = x + to_d(x, s, denoised) * (down - s)
        else:
            h = _t(down) - _t(s)
            s_mid = math.exp(-(_t(s) + h / 2))
            x2 = (s_mid / s) * x - math.expm1(-h / 2) * denoised
            x = (down / s) * x - math.expm1(-h) * _call(den, x2, s_mid, extra)
        if sn > 0 and up > 0:
            x = x + noise(x) * s_noise * up
    return x


def sample_dpmpp_sde(den, x, sigmas, *, extra_args=None, callback=None, generator=None,
                     eta=1.0, s_noise=1.0, r=0.5, **_):
    """DPM-Solver++ (stochastic, 2 evaluations per step); the two sub-steps' noise comes from
    one Brownian path, so it is correlated as the SDE requires."""
    extra, noise = extra_args or {}, BrownianNoise(generator)
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = x + to_d(x, s, denoised) * (sn - s)
            continue
        t, tn = _t(s), _t(sn)
        h = tn - t
        s_mid = math.exp(-(t + h * r))
        down, up = ancestral_step(s, s_mid, eta)
        x2 = (down / s) * x - math.expm1(t - _t(down)) * denoised
        if up > 0:
            x2 = x2 + noise(x, s, s_mid) * s_noise * up
        den2 = _call(den, x2, s_mid, extra)
        down, up = ancestral_step(s, sn, eta)
        fac = 1 / (2 * r)
        dd = (1 - fac) * denoised + fac * den2
        x = (down / s) * x - math.expm1(t - _t(down)) * dd
        if up > 0:
            x = x + noise(x, s, sn) * s_noise * up
    return x


def _dpmpp_2m_sde(den, x, sigmas, extra, callback, generator, eta, s_noise, heun: bool):
    noise = Noise(generator)
    old, h_last = None, None
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = denoised
            break
        h = _t(sn) - _t(s)
        eh = eta * h
        x = (sn / s) * math.exp(-eh) * x - math.expm1(-h - eh) * denoised
        if old is not None:
            r = h_last / h
            if heun:
                coef = -math.expm1(-h - eh) / (-h - eh) + 1
            else:
                coef = 0.5 * -math.expm1(-h - eh)
            x = x + coef * (1 / r) * (denoised - old)
        if eta:
            x = x + noise(x) * sn * math.sqrt(-math.expm1(-2 * eh)) * s_noise
        old, h_last = denoised, h
    return x


def sample_dpmpp_2m_sde(den, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta=1.0, s_noise=1.0, **_):
    """DPM-Solver++(2M) SDE, midpoint correction (Lu et al. 2022b)."""
    return _dpmpp_2m_sde(den, x, sigmas, extra_args or {}, callback, generator, eta, s_noise,
                         heun=False)


def sample_dpmpp_2m_sde_heun(den, x, sigmas, *, extra_args=None, callback=None,
                             generator=None, eta=1.0, s_noise=1.0, **_):
    return _dpmpp_2m_sde(den, x, sigmas, extra_args or {}, callback, generator, eta, s_noise,
                         heun=True)


def sample_dpmpp_3m_sde(den, x, sigmas, *, extra_args=None, callback=None, generator=None,
                        eta=1.0, s_noise=1.0, **_):
    """DPM-Solver++(3M) SDE: third-order multistep with an exponential integrator."""
    extra, noise = extra_args or {}, Noise(generator)
    d1_, d2_, h1, h2 = None, None, None, None
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        if sn == 0:
            x = denoised
            break
        h = _t(sn) - _t(s)
        he = h * (eta + 1)
        x = math.exp(-he) * x - math.expm1(-he) * denoised
        phi2 = math.expm1(-he) / he + 1
        if h2 is not None:
            r0, r1 = h1 / h, h2 / h
            e0 = (denoised - d1_) / r0
            e1 = (d1_ - d2_) / r1
            dd1 = e0 + (e0 - e1) * r0 / (r0 + r1)
            dd2 = (e0 - e1) / (r0 + r1)
            x = x + phi2 * dd1 - (phi2 / he - 0.5) * dd2
        elif h1 is not None:
            x = x + phi2 * (denoised - d1_) / (h1 / h)
        if eta:
            x = x + noise(x) * sn * math.sqrt(-math.expm1(-2 * h * eta)) * s_noise
        d2_, d1_ = d1_, denoised
        h2, h1 = h1, h
    return x


def _alpha_bar(sigma: float) -> float:
    return 1.0 / (1.0 + sigma * sigma)


def sample_ddim(den, x, sigmas, *, extra_args=None, callback=None, generator=None, eta=0.0,
                **_):
    """DDIM (Song et al. 2021) in sigma space; eta = 0 is deterministic (equal to Euler)."""
    extra, noise = extra_args or {}, Noise(generator)
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        eps = to_d(x, s, denoised)
        if sn == 0:
            x = denoised
            continue
        a, an = _alpha_bar(s), _alpha_bar(sn)
        sd = eta * math.sqrt((1 - an) / (1 - a) * (1 - a / an))
        # DDIM update in the variance-preserving scale, then back to x = x_vp / sqrt(ᾱ)
        x_vp = math.sqrt(an) * denoised + math.sqrt(max(1 - an - sd ** 2, 0.0)) * eps
        if sd > 0:
            x_vp = x_vp + sd * noise(x)
        x = x_vp / math.sqrt(an)
    return x


def sample_plms(den, x, sigmas, *, extra_args=None, callback=None, generator=None, **_):
    """PLMS / PNDM (Liu et al. 2022): Adams–Bashforth on eps over DDIM steps, warmed up with
    a pseudo improved-Euler step."""
    extra = extra_args or {}
    eps_hist: list[torch.Tensor] = []
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        e = to_d(x, s, denoised)
        if not eps_hist and sn > 0:
            x_next = x + e * (sn - s)
            e_next = to_d(x_next, sn, _call(den, x_next, sn, extra))
            ep = (e + e_next) / 2
        elif len(eps_hist) == 1:
            ep = (3 * e - eps_hist[-1]) / 2
        elif len(eps_hist) == 2:
            ep = (23 * e - 16 * eps_hist[-1] + 5 * eps_hist[-2]) / 12
        elif len(eps_hist) >= 3:
            ep = (55 * e - 59 * eps_hist[-1] + 37 * eps_hist[-2] - 9 * eps_hist[-3]) / 24
        else:
            ep = e
        eps_hist.append(e)
        x = x + ep * (sn - s)
    return x


def sample_unipc(den, x, sigmas, *, extra_args=None, callback=None, generator=None, order=2,
                 **_):
    """UniPC with B(h) = expm1(h) ("bh2"), data prediction (Zhao et al. 2023): a UniP predictor
    and a UniC corrector that reuses the next model evaluation."""
    extra = extra_args or {}
    ms: list[torch.Tensor] = []
    lams: list[float] = []
    x_prev = None
    used_order = 1
    n = len(sigmas) - 1
    for i, s, sn in _loop(sigmas):
        m = _call(den, x, s, extra)
        _cb(callback, i, x, s, m)
        if ms:  # UniC: correct the previous step with the model output at its end
            x = _unipc_update(x_prev, ms, lams, _t(s), used_order, s, model_t=m)
        ms.append(m)
        lams.append(_t(s))
        del ms[:-order], lams[:-order]
        if sn == 0:
            x = m
            break
        used_order = min(order, len(ms), n - i)  # lower order on the final steps
        x_prev = x
        x = _unipc_update(x, ms, lams, _t(sn), used_order, sn)
    return x


def _unipc_update(x, ms, lams, lam_t, order, sigma_t, model_t=None):
    m0, lam0 = ms[-1], lams[-1]
    sigma0 = math.exp(-lam0)
    h = lam_t - lam0
    hh = -h
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh)
    rks, d1s = [], []
    for k in range(1, order):
        rk = (lams[-1 - k] - lam0) / h
        rks.append(rk)
        d1s.append((ms[-1 - k] - m0) / rk)
    rks.append(1.0)
    R, b = [], []
    h_phi_k = h_phi_1 / hh - 1
    fact = 1
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * fact / b_h)
        fact *= k + 1
        h_phi_k = h_phi_k / hh - 1 / fact
    x_t_ = (sigma_t / sigma0) * x - h_phi_1 * m0
    if model_t is None:  # UniP predictor
        if not d1s:
            return x_t_
        rhos = [0.5] if order == 2 else np.linalg.solve(np.array(R)[:-1, :-1], np.array(b)[:-1])
        return x_t_ - b_h * sum(float(r) * d for r, d in zip(rhos, d1s))
    rhos_c = [0.5] if order == 1 else np.linalg.solve(np.array(R), np.array(b))
    corr = sum(float(r) * d for r, d in zip(rhos_c[:-1], d1s)) if d1s else 0
    return x_t_ - b_h * (corr + float(rhos_c[-1]) * (model_t - m0))


def sample_lcm(den, x, sigmas, *, extra_args=None, callback=None, generator=None, **_):
    """Latent consistency sampling (Luo et al. 2023): jump to x̂0, re-noise to the next sigma."""
    extra, noise = extra_args or {}, Noise(generator)
    for i, s, sn in _loop(sigmas):
        denoised = _call(den, x, s, extra)
        _cb(callback, i, x, s, denoised)
        x = denoised
        if sn > 0:
            x = x + noise(x) * sn
    return x


@dataclass(frozen=True)
class SamplerSpec:
    name: str  # A1111 name
    fn: Callable
    scheduler: str  # what "automatic" means for this sampler (A1111)
    aliases: tuple[str, ...] = field(default_factory=tuple)
    stochastic: bool = False


SAMPLERS: dict[str, SamplerSpec] = {s.name: s for s in [
    SamplerSpec("DPM++ 2M", sample_dpmpp_2m, "karras", ("k_dpmpp_2m", "dpmpp_2m")),
    SamplerSpec("DPM++ SDE", sample_dpmpp_sde, "karras", ("k_dpmpp_sde", "dpmpp_sde"), True),
    SamplerSpec("DPM++ 2M SDE", sample_dpmpp_2m_sde, "exponential",
                ("k_dpmpp_2m_sde", "dpmpp_2m_sde"), True),
    SamplerSpec("DPM++ 2M SDE Heun", sample_dpmpp_2m_sde_heun, "exponential",
                ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun"), True),
    SamplerSpec("DPM++ 2S a", sample_dpmpp_2s_ancestral, "karras",
                ("k_dpmpp_2s_a", "dpmpp_2s_ancestral"), True),
    SamplerSpec("DPM++ 3M SDE", sample_dpmpp_3m_sde, "exponential",
                ("k_dpmpp_3m_sde", "dpmpp_3m_sde"), True),
    SamplerSpec("Euler a", sample_euler_ancestral, "uniform", ("k_euler_a", "euler_ancestral"),
                True),
    SamplerSpec("Euler", sample_euler, "uniform", ("k_euler", "euler")),
    SamplerSpec("LMS", sample_lms, "uniform", ("k_lms", "lms")),
    SamplerSpec("Heun", sample_heun, "uniform", ("k_heun", "heun")),
    SamplerSpec("DPM2", sample_dpm_2, "karras", ("k_dpm_2", "dpm_2")),
    SamplerSpec("DPM2 a", sample_dpm_2_ancestral, "karras", ("k_dpm_2_a", "dpm_2_ancestral"),
                True),
    SamplerSpec("DDIM", sample_ddim, "ddim_uniform", ("ddim",)),
    SamplerSpec("PLMS", sample_plms, "ddim_uniform", ("plms",)),
    SamplerSpec("UniPC", sample_unipc, "uniform", ("unipc", "uni_pc", "uni_pc_bh2")),
    SamplerSpec("LCM", sample_lcm, "sgm_uniform", ("lcm",), True),
]}

_LOOKUP = {k.lower(): v for k, v in SAMPLERS.items()}
_LOOKUP.update({a.lower(): v for v in SAMPLERS.values() for a in v.aliases})
_SUFFIXES = {" karras": "karras", " exponential": "exponential",
             " sgm uniform": "sgm_uniform", " uniform": "uniform"}


def resolve_sampler(name: str | None, scheduler: str | None = None) -> tuple[SamplerSpec, str]:
    """A1111 sampler name (also pre-1.9 combined names like "DPM++ 2M Karras" and ComfyUI names)
    and scheduler → (spec, concrete scheduler key)."""
    key = (name or "Euler").strip().lower()
    implied = None
    if key not in _LOOKUP:
        for suf, sch in _SUFFIXES.items():
            if key.endswith(suf) and key[:-len(suf)] in _LOOKUP:
                key, implied = key[:-len(suf)], sch
                break
    spec = _LOOKUP.get(key)
    if spec is None:
        raise SdloomError(f"unknown sampler {name!r}; choose from: " + ", ".join(SAMPLERS))
    sch = scheduler_key(scheduler) if scheduler else "automatic"
    if sch == "automatic":
        sch = implied or spec.scheduler
    return spec, sch


def scheduler_label(key: str) -> str:
    return LABELS.get(key, key)
