"""Noise for samplers: fresh per-image CPU noise, the Brownian tree the SDE samplers share, and
the noise forms (VE: x = x0 + σ·ε; flow: x = (1 − σ)·x0 + σ·ε) that ancestral and SDE steps
re-noise in. Split from samplers.py, which imports everything here."""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence

import torch

from ..errors import SdloomError

Generators = torch.Generator | Sequence[torch.Generator] | None
NoiseFn = Callable[[float, float], torch.Tensor]  # (sigma, sigma_next) -> N(0, I) like x


# ---------------------------------------------------------------------- noise
def _draw(shape: tuple[int, ...], generator: Generators) -> torch.Tensor:
    """Standard normal noise on the CPU in float32; with a list, image i from generator i."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"{len(generator)} generators for a batch of {shape[0]}")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32)
                        for g in generator])


class NoiseSampler:
    """Fresh independent noise like x at every call, drawn on the CPU from the generator(s)."""

    def __init__(self, x: torch.Tensor, generator: Generators = None):
        self.shape, self.device, self.dtype = tuple(x.shape), x.device, x.dtype
        self.generator = generator

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        return _draw(self.shape, self.generator).to(self.device, self.dtype)


def _node_seed(seed: int, node: int) -> int:
    """An independent 63-bit seed for one node of a Brownian tree."""
    digest = hashlib.blake2b(f"{seed}:{node}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _BrownianPath:
    """A Brownian path on [t0, t1] fixed by a seed (virtual Brownian tree, Li et al. 2020)."""
    # W(t) is found by bisecting [t0, t1]: each midpoint is a Brownian-bridge sample, the mean
    # of the ends plus √(len/4)·z, with z from a generator seeded by (seed, node). So W(t)
    # does not depend on which other points were asked for, or in what order, and a schedule
    # with more steps sees the same path, refined. Below `tol`, W is interpolated linearly.

    def __init__(self, seed: int, shape: tuple[int, ...], t0: float, t1: float,
                 tol: float = 1e-6):
        self.seed, self.shape, self.t0, self.t1 = seed, shape, t0, t1
        self.depth = max(1, min(48, math.ceil(math.log2(max(t1 - t0, tol) / tol))))
        self.w1 = self._z(0) * math.sqrt(t1 - t0)
        self.cache: dict[float, torch.Tensor] = {}

    def _z(self, node: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(_node_seed(self.seed, node))
        return torch.randn(self.shape, generator=g, dtype=torch.float32)

    def __call__(self, t: float) -> torch.Tensor:
        t = min(max(t, self.t0), self.t1)
        if t in self.cache:
            return self.cache[t]
        a, b, wa, wb, node = self.t0, self.t1, torch.zeros(self.shape), self.w1, 1
        for _ in range(self.depth):
            if t == a or t == b:
                break
            m = (a + b) / 2
            wm = (wa + wb) / 2 + self._z(node) * math.sqrt((b - a) / 4)
            if t < m:
                b, wb, node = m, wm, 2 * node
            else:
                a, wa, node = m, wm, 2 * node + 1
        w = wa if t == a else wb if t == b else wa + (wb - wa) * ((t - a) / (b - a))
        if len(self.cache) > 8:  # a sampler only revisits the last few sigmas
            self.cache.pop(next(iter(self.cache)))
        self.cache[t] = w
        return w


class BrownianTreeNoiseSampler:
    """(W(σ_next) − W(σ))/√|σ_next − σ| on one Brownian path per image (as k-diffusion)."""
    # The SDE samplers need one path: DPM++ SDE's two sub-steps overlap and must see
    # correlated noise, and a fixed path makes a seed's image converge as the step count
    # grows. The path's seed is drawn from the generator (per image when given a list).

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float,
                 generator: Generators = None):
        self.device, self.dtype = x.device, x.dtype
        self.per_image = generator is not None and not isinstance(generator, torch.Generator)
        gens = list(generator) if self.per_image else [generator]
        if self.per_image and len(gens) != x.shape[0]:
            raise ValueError(f"{len(gens)} generators for a batch of {x.shape[0]}")
        shape = tuple(x.shape[1:]) if self.per_image else tuple(x.shape)
        self.paths = [_BrownianPath(int(torch.randint(0, 2 ** 62, (), generator=g)), shape,
                                    float(sigma_min), float(sigma_max)) for g in gens]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        a, b = float(sigma), float(sigma_next)
        dw = [p(b) - p(a) for p in self.paths]
        out = torch.stack(dw) if self.per_image else dw[0]
        return (out / math.sqrt(abs(b - a))).to(self.device, self.dtype)


def _brownian(x: torch.Tensor, sigmas: torch.Tensor, generator: Generators) -> NoiseFn:
    positive = sigmas[sigmas > 0]
    return BrownianTreeNoiseSampler(x, float(positive.min()), float(sigmas.max()), generator)


def ancestral_step(sigma: float, sigma_next: float, eta: float = 1.0) -> tuple[float, float]:
    """(σ_down, σ_up) with σ_down² + σ_up² = σ_next² (k-diffusion get_ancestral_step)."""
    # eta = 1 is DDPM's posterior variance, eta = 0 the deterministic (DDIM/Euler) step
    if not eta or not sigma_next:
        return sigma_next, 0.0
    up = min(sigma_next, eta * math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2)
                                         / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


# ---------------------------------------------------------------------- noise forms
class NoiseForm:
    """How x mixes data and noise at σ, x = α(σ)·x0 + σ·ε: what a sampler that re-injects
    noise (ancestral, SDE) needs to know. The VE form (α = 1) is the default; its methods
    return exactly the expressions the samplers used before forms existed, so VE sampling is
    unchanged bit for bit."""
    name = "ve"

    def alpha(self, sigma: float) -> float:
        return 1.0

    def lam(self, sigma: float) -> float:
        """Half-log-SNR λ = log(α/σ), DPM-Solver's time variable (Lu et al. 2022)."""
        return -math.log(sigma)

    def sigma_at(self, lam: float) -> float:
        """The σ whose half-log-SNR is λ."""
        return math.exp(-lam)

    def ve_sigma(self, sigma: float) -> float:
        """σ/α: the noise level of x/α, which is in VE form."""
        return sigma

    def ancestral(self, sigma: float, sigma_next: float,
                  eta: float = 1.0) -> tuple[float, float, float]:
        """(σ_down, σ_up, scale): step deterministically to σ_down, then x ← scale·x + σ_up·z
        lands at σ_next."""
        down, up = ancestral_step(sigma, sigma_next, eta)
        return down, up, 1.0

    def for_lam(self, sigmas: torch.Tensor) -> torch.Tensor:
        """The grid with λ finite at every positive sigma (VE: as given)."""
        return sigmas

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return x0 + noise * sigma


class FlowForm(NoiseForm):
    """Rectified flow, x = (1 − σ)·x0 + σ·ε (SD3; ComfyUI's CONST model sampling)."""
    name = "flow"
    # λ = log((1 − σ)/σ) is −∞ at σ = 1, where a txt2img flow grid starts; the samplers
    # that step in λ start at 1 − 1e-4 instead (ComfyUI offset_first_sigma_for_snr): x is
    # pure noise either way, to within 1e-4 of the data
    first_sigma = 1 - 1e-4

    def alpha(self, sigma: float) -> float:
        return 1.0 - sigma

    def lam(self, sigma: float) -> float:
        return math.log1p(-sigma) - math.log(sigma)

    def sigma_at(self, lam: float) -> float:
        return 1.0 / (1.0 + math.exp(lam))

    def ve_sigma(self, sigma: float) -> float:
        return sigma / (1.0 - sigma)

    def ancestral(self, sigma: float, sigma_next: float,
                  eta: float = 1.0) -> tuple[float, float, float]:
        # ComfyUI's RF ancestral step: σ_down = σ_next·(1 + (σ_next/σ − 1)·η) (η = 1: σ_next²/σ),
        # then x·α_next/α_down has noise σ_down·α_next/α_down and fresh noise makes up σ_next
        if not eta or not sigma_next:
            return sigma_next, 0.0, 1.0
        down = max(0.0, sigma_next * (1 + (sigma_next / sigma - 1) * eta))
        scale = (1 - sigma_next) / (1 - down)
        return down, math.sqrt(max(0.0, sigma_next ** 2 - (down * scale) ** 2)), scale

    def for_lam(self, sigmas: torch.Tensor) -> torch.Tensor:
        if len(sigmas) < 2 or float(sigmas[0]) < self.first_sigma:
            return sigmas
        out = sigmas.clone()
        out[0] = self.first_sigma
        return out

    def noised(self, x0: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
        return x0 * (1 - sigma) + noise * sigma


NOISE_FORMS: dict[str, NoiseForm] = {"ve": NoiseForm(), "flow": FlowForm()}


def noise_form_of(name: str | NoiseForm) -> NoiseForm:
    """A NoiseForm by name ("ve", "flow"), as the model samplings' `noise_form` names it."""
    if isinstance(name, NoiseForm):
        return name
    form = NOISE_FORMS.get(name)
    if form is None:
        raise SdloomError(f"unknown noise form {name!r}; choose from: " + ", ".join(NOISE_FORMS))
    return form


def _renoise(x: torch.Tensor, noise: NoiseFn, s: float, sn: float, s_noise: float, up: float,
             scale: float) -> torch.Tensor:
    """x ← scale·x + s_noise·σ_up·z, the second half of an ancestral step."""
    if scale != 1.0:
        x = x * scale
    return x + noise(s, sn) * s_noise * up


