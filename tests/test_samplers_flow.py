"""Ancestral and SDE samplers on rectified flow (x = (1 − σ)·x0 + σ·ε, SD3) against an analytic
flow denoiser: Gaussian data, exact x̂0 = E[x0 | x_σ], so the samples' law is known."""
import math

import pytest
import torch

from sdloom.errors import SdloomError
from sdloom.sampling.model_sampling import DiscreteSampling, FlowSampling, FlowSchedule
from sdloom.sampling.noise import NOISE_FORMS, FlowForm, noise_form_of
from sdloom.sampling.samplers import (SAMPLERS, sample_ddim, sample_dpm_2, sample_dpm_2_ancestral,
                                      sample_euler, sample_euler_ancestral, sample_lcm)
from sdloom.sampling.schedules import DiscreteSchedule

MU = torch.tensor([-1.0, -0.3, 0.4, 1.0], dtype=torch.float64)
S = 0.5  # data std
N = 20000  # samples per dimension
SCHED = FlowSchedule(3.0)  # SD3's shift; sigmas[0] = 1 exactly, as in txt2img
# A correct sampler lands within 0.006 (mean) and 0.006 (std, Euler a's first-order bias at
# 800 steps included) of N(MU, S²) here; the statistical error alone is ~0.004/0.003 at 1 sd.
# A VE renoise on flow, or the α_next/α_down scaling dropped, is off by ≥ 0.2 in both.
TOL = 0.015

# (sampler, steps): Euler a's ancestral bias in std shrinks only as 1/steps (−0.035 at 100)
FLOW_STOCHASTIC = [("Euler a", 800), ("DPM2 a", 60), ("DPM++ 2S a", 60), ("DPM++ SDE", 60),
                   ("DPM++ 2M SDE", 60), ("DPM++ 2M SDE Heun", 60), ("DPM++ 3M SDE", 60)]


def flow_analytic(x, sigma, **_):
    """E[x0 | x] for x0 ~ N(MU, S²) per dimension, x = (1 − σ)·x0 + σ·ε."""
    s = sigma.to(x.dtype)[:, None]
    a = 1 - s
    return MU + a * S * S / (a * a * S * S + s * s) * (x - a * MU)


def _run(name, steps, form, eta=1.0, n=N, seed=0):
    spec = SAMPLERS[name]
    sig = spec.sigmas("automatic", steps, SCHED).double()
    assert float(sig[0]) == 1.0
    x = torch.randn(n, len(MU), generator=torch.Generator().manual_seed(seed),
                    dtype=torch.float64)  # pure noise: x at σ = 1
    return spec.fn(flow_analytic, x, sig, generator=torch.Generator().manual_seed(seed + 1),
                   eta=eta, noise_form=form)


def _moment_errors(out):
    return ((out.mean(0) - MU).abs().max().item(), (out.std(0) - S).abs().max().item())


@pytest.mark.parametrize("name,steps", FLOW_STOCHASTIC, ids=[n for n, _ in FLOW_STOCHASTIC])
def test_flow_samplers_at_eta_1_sample_the_data_distribution(name, steps):
    assert SAMPLERS[name].supports("flow")
    dm, ds = _moment_errors(_run(name, steps, "flow"))
    assert dm < TOL and ds < TOL, (dm, ds)


@pytest.mark.parametrize("name,steps", FLOW_STOCHASTIC, ids=[n for n, _ in FLOW_STOCHASTIC])
def test_negative_control_the_ve_noise_on_flow_misses_the_distribution(name, steps):
    # the same sampler, same noise, told the VE form: what the pipeline refused to run
    dm, ds = _moment_errors(_run(name, steps, "ve"))
    assert dm > 10 * TOL and ds > 10 * TOL, (dm, ds)


class _NoAlphaScaling(FlowForm):
    """The flow σ_down but VE renoise: x + √(σ_next² − σ_down²)·z, no α_next/α_down."""

    def ancestral(self, sigma, sigma_next, eta=1.0):
        down, _, _ = super().ancestral(sigma, sigma_next, eta)
        return down, math.sqrt(max(0.0, sigma_next ** 2 - down ** 2)), 1.0


@pytest.mark.parametrize("name", ["Euler a", "DPM2 a", "DPM++ 2S a"])
def test_negative_control_dropping_the_alpha_scaling_misses_the_distribution(name):
    dm, ds = _moment_errors(_run(name, dict(FLOW_STOCHASTIC)[name], _NoAlphaScaling()))
    assert dm > 10 * TOL and ds > 10 * TOL, (dm, ds)


def test_rf_ancestral_step_by_hand():
    # σ = 0.8 → 0.5, η = 1: σ_down = 0.5·(1 + (0.625 − 1)) = 0.3125, scale = 0.5/0.6875,
    # σ_up = √(0.25 − (0.3125·0.5/0.6875)²)
    down, up, scale = NOISE_FORMS["flow"].ancestral(0.8, 0.5, 1.0)
    assert down == pytest.approx(0.3125, abs=1e-15)
    assert scale == pytest.approx(0.727272727272727, abs=1e-14)
    assert up == pytest.approx(0.4453617714151233, abs=1e-14)
    # η = 0.5: σ_down = 0.5·(1 − 0.1875) = 0.40625
    assert NOISE_FORMS["flow"].ancestral(0.8, 0.5, 0.5)[0] == pytest.approx(0.40625, abs=1e-15)
    # η = 0 and the last step add nothing
    assert NOISE_FORMS["flow"].ancestral(0.8, 0.5, 0.0) == (0.5, 0.0, 1.0)
    assert NOISE_FORMS["flow"].ancestral(0.8, 0.0, 1.0) == (0.0, 0.0, 1.0)
    # after the step the noise level is σ_next again: (σ_down·scale)² + σ_up² = σ_next²
    for s, sn, eta in [(1.0, 0.9, 1.0), (0.6, 0.2, 0.7), (0.3, 0.05, 1.0)]:
        down, up, scale = NOISE_FORMS["flow"].ancestral(s, sn, eta)
        assert (down * scale) ** 2 + up ** 2 == pytest.approx(sn ** 2, abs=1e-12)
        assert (1 - down) * scale == pytest.approx(1 - sn, abs=1e-12)  # data weight α_next


def test_flow_form_half_log_snr():
    f = NOISE_FORMS["flow"]
    assert f.lam(0.5) == 0.0
    assert f.lam(0.2) == pytest.approx(math.log(4), abs=1e-14)
    for s in (0.01, 0.3, 0.97):
        assert f.sigma_at(f.lam(s)) == pytest.approx(s, abs=1e-14)
        assert f.ve_sigma(s) == pytest.approx(math.exp(-f.lam(s)), rel=1e-13)
    # a grid starting at σ = 1 (λ = −∞) starts at 1 − 1e-4 for the λ samplers; VE is untouched
    sig = torch.tensor([1.0, 0.5, 0.0], dtype=torch.float64)
    assert f.for_lam(sig).tolist() == [1 - 1e-4, 0.5, 0.0] and sig[0] == 1.0
    assert NOISE_FORMS["ve"].for_lam(sig) is sig


def test_eta_0_ancestral_equals_its_deterministic_sampler_on_flow():
    sig = SAMPLERS["Euler a"].sigmas("automatic", 12, SCHED).double()
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    kw = {"generator": torch.Generator().manual_seed(4), "eta": 0.0, "noise_form": "flow"}
    assert torch.equal(sample_euler_ancestral(flow_analytic, x, sig, **kw),
                       sample_euler(flow_analytic, x, sig))
    assert torch.equal(sample_dpm_2_ancestral(flow_analytic, x, sig, **kw),
                       sample_dpm_2(flow_analytic, x, sig))
    # and at eta = 1 they are not
    kw["eta"] = 1.0
    assert not torch.allclose(sample_euler_ancestral(flow_analytic, x, sig, **kw),
                              sample_euler(flow_analytic, x, sig), atol=1e-3)


@pytest.mark.parametrize("name", ["DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE",
                                  "DPM++ 2M SDE Heun", "DPM++ 3M SDE"])
def test_eta_0_flow_solvers_follow_the_flow_ode_at_second_order(name):
    # the flow ODE maps noise ξ at σ = 1 to μ + s·ξ for Gaussian data (a monotone linear map
    # between N(0, 1) and N(μ, s²)); 10/20/40 steps: errors fall ~4× per doubling
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    errs = []
    for steps in (10, 20, 40):
        sig = SAMPLERS[name].sigmas("automatic", steps, SCHED).double()
        out = SAMPLERS[name].fn(flow_analytic, x.clone(), sig, eta=0.0, noise_form="flow")
        errs.append((out - (MU + S * x)).abs().max().item())
    assert errs[2] < 0.012, errs
    assert math.log2(errs[1] / errs[2]) > 1.8, errs


def test_every_flow_stochastic_sampler_uses_the_form():
    # a sampler listed as flow-capable that ignored noise_form would re-noise in the VE form
    flow_ok = {n for n, s in SAMPLERS.items() if s.stochastic and s.flow}
    assert flow_ok == {n for n, _ in FLOW_STOCHASTIC} | {"LCM"}
    sig = SAMPLERS["Euler a"].sigmas("automatic", 8, SCHED).double()
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for name in flow_ok:
        out = {form: SAMPLERS[name].fn(flow_analytic, x.clone(), sig, eta=1.0, noise_form=form,
                                       generator=torch.Generator().manual_seed(1))
               for form in ("ve", "flow")}
        assert not torch.allclose(out["ve"], out["flow"], atol=1e-3), name


def test_lcm_renoises_in_the_flow_form():
    sig = torch.tensor([1.0, 0.6, 0.25, 0.0], dtype=torch.float64)
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn, seen = [], []

    def noise(s, sn):
        drawn.append(torch.randn(2, 4, generator=torch.Generator().manual_seed(len(drawn) + 9),
                                 dtype=torch.float64))
        return drawn[-1]

    def den(x_, sigma, **_):
        seen.append(x_.clone())
        return flow_analytic(x_, sigma)

    out = sample_lcm(den, x, sig, noise_sampler=noise, noise_form="flow")
    for k in (1, 2):  # x at σ_k is (1 − σ_k)·x̂0 + σ_k·z
        s, x0 = float(sig[k]), flow_analytic(seen[k - 1], sig[k - 1:k])
        assert torch.allclose(seen[k], (1 - s) * x0 + s * drawn[k - 1], atol=1e-14)
    assert torch.allclose(out, flow_analytic(seen[2], sig[2:3]), atol=1e-14)


def test_refused_on_flow():
    for name in ("DPM fast", "DPM adaptive", "Restart"):
        assert SAMPLERS[name].stochastic and not SAMPLERS[name].supports("flow")
        assert SAMPLERS[name].supports("ve")
    assert SAMPLERS["Euler"].supports("flow") and SAMPLERS["DDIM"].supports("flow")
    assert not SAMPLERS["Euler a"].supports("sub-vp")
    sig = SAMPLERS["DDIM"].sigmas("automatic", 4, SCHED).double()
    x = torch.zeros(1, 4, dtype=torch.float64)
    with pytest.raises(SdloomError, match="eta"):
        sample_ddim(flow_analytic, x, sig, eta=0.5, noise_form="flow")
    # eta = 0 DDIM is Euler, which flow shares
    assert torch.allclose(sample_ddim(flow_analytic, x, sig, eta=0.0, noise_form="flow"),
                          sample_euler(flow_analytic, x, sig), atol=1e-12)
    with pytest.raises(SdloomError, match="noise form"):
        noise_form_of("vp")


def test_model_samplings_name_their_noise_form():
    assert FlowSampling().noise_form == "flow"
    assert DiscreteSampling(DiscreteSchedule.scaled_linear(), "eps").noise_form == "ve"
    assert set(NOISE_FORMS) == {"ve", "flow"}
    # the VE form is the default and its renoise is x + σ_up·z (scale 1)
    assert NOISE_FORMS["ve"].ancestral(2.0, 1.0, 1.0)[2] == 1.0
