"""Noise schedules: the SD sigma table, the A1111 schedulers, and scheduler names."""
import math

import pytest
import torch

from sdloom.errors import SdloomError
from sdloom.sampling.samplers import SAMPLERS
from sdloom.sampling.schedules import (SCHEDULERS, DiscreteSchedule, get_sigmas, karras_sigmas,
                                       scheduler_key, scheduler_label)

SCHED = DiscreteSchedule.scaled_linear()


def test_sd_table_endpoints_and_known_sigmas():
    # SD 1.x/2.x/XL: the well-known σ range 0.0292 … 14.6146 of the scaled-linear betas
    assert SCHED.sigma_max == pytest.approx(14.614641, abs=1e-5)
    assert SCHED.sigma_min == pytest.approx(0.029167, abs=1e-5)
    ac = SCHED.alphas_cumprod
    assert ac.dtype == torch.float64 and len(ac) == 1000
    # ᾱ_0 = 1 − β_0 and σ_t = √((1 − ᾱ)/ᾱ)
    assert float(ac[0]) == pytest.approx(1 - 0.00085, rel=1e-12)
    assert float(SCHED.sigmas[499]) == pytest.approx(math.sqrt((1 - ac[499]) / ac[499]), rel=1e-6)


def test_sigma_t_round_trip_is_log_linear():
    t = torch.tensor([0.0, 10.0, 499.25, 998.5, 999.0])
    back = SCHED.sigma_to_t(SCHED.t_to_sigma(t))
    torch.testing.assert_close(back, t, atol=2e-3, rtol=0)
    # halfway between two table entries in t is the geometric mean in σ
    mid = SCHED.t_to_sigma(torch.tensor([500.5]))
    geo = (SCHED.sigmas[500] * SCHED.sigmas[501]).sqrt()
    torch.testing.assert_close(mid, geo.reshape(1), rtol=1e-6, atol=0)
    # outside the table t clamps to the ends rather than extrapolating
    assert SCHED.sigma_to_t(torch.tensor([100.0, 1e-4])).tolist() == [999.0, 0.0]
    # shape is kept for a batch of sigmas
    assert SCHED.sigma_to_t(torch.full((2, 3), 1.0)).shape == (2, 3)


def test_karras_golden_values_at_20_steps():
    k = get_sigmas("karras", 20, SCHED)
    assert len(k) == 21 and k.dtype == torch.float32 and k[-1] == 0
    assert k[0].item() == pytest.approx(14.6146, abs=1e-4)
    assert k[-2].item() == pytest.approx(0.0292, abs=1e-4)
    # eq. 5 of Karras et al.: σ^(1/7) is evenly spaced
    inv = k[:-1].double() ** (1 / 7)
    torch.testing.assert_close(inv.diff(), inv.diff().mean().expand(19), rtol=1e-4, atol=0)


def test_golden_values_of_the_other_schedulers():
    # values of the A1111 / ComfyUI definitions on the SD table, 10 steps, checked by hand
    # against k-diffusion's get_sigmas (uniform) and diffusers' linspace/karras sigmas
    golden = {
        "uniform": [14.6146, 7.8399, 4.6092, 2.9183, 1.9502, 1.3449, 0.9324, 0.6250, 0.3687,
                    0.0292],
        "exponential": [14.6146, 7.3249, 3.6712, 1.8400, 0.9222, 0.4622, 0.2317, 0.1161,
                        0.0582, 0.0292],
        "sgm_uniform": [14.6146, 8.3072, 5.0924, 3.3251, 2.2797, 1.6156, 1.1629, 0.8319,
                        0.5712, 0.3437],
        "simple": [14.6146, 8.3028, 5.0878, 3.3211, 2.2765, 1.6129, 1.1606, 0.8299, 0.5693,
                   0.3417],
        # DDIM's t = 901, 801, …, 1
        "ddim_uniform": [float(SCHED.sigmas[t]) for t in range(901, 0, -100)],
    }
    for name, want in golden.items():
        got = get_sigmas(name, 10, SCHED)
        torch.testing.assert_close(got[:-1], torch.tensor(want), atol=1e-4, rtol=0,
                                   msg=name)
    # "normal" is k-diffusion's uniform discretisation by another route
    torch.testing.assert_close(get_sigmas("normal", 10, SCHED), get_sigmas("uniform", 10, SCHED),
                               atol=1e-5, rtol=1e-5)
    # KL-optimal: evenly spaced in arctan σ, from σ_max to σ_min
    kl = get_sigmas("kl_optimal", 10, SCHED)[:-1].double().atan()
    torch.testing.assert_close(kl.diff(), kl.diff().mean().expand(9), rtol=1e-4, atol=0)
    assert kl[0].item() == pytest.approx(math.atan(SCHED.sigma_max), rel=1e-6)
    assert kl[-1].item() == pytest.approx(math.atan(SCHED.sigma_min), rel=1e-5)


def test_beta_scheduler_matches_scipy_quantiles():
    import scipy.stats as stats
    got = get_sigmas("beta", 12, SCHED)
    q = [1 - i / 11 for i in range(12)]
    want = [SCHED.sigma_min + stats.beta.ppf(v, 0.6, 0.6) * (SCHED.sigma_max - SCHED.sigma_min)
            for v in q]
    torch.testing.assert_close(got[:-1].double(), torch.tensor(want, dtype=torch.float64),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_every_scheduler_is_decreasing_and_ends_in_zero(name, n):
    s = get_sigmas(name, n, SCHED)
    assert s.shape == (n + 1,) and s.dtype == torch.float32
    assert s[-1] == 0 and (s[:-1] > 0).all()
    assert (s.diff() < 0).all(), s
    assert s[0] <= SCHED.sigma_max * (1 + 1e-6)


def test_discarded_penultimate_sigma_keeps_the_step_count():
    spec = SAMPLERS["DPM2"]
    s = spec.sigmas("automatic", 20, SCHED)
    full = get_sigmas("karras", 21, SCHED)
    assert len(s) == 21 and s[-1] == 0
    # A1111: 21 Karras sigmas, σ_min dropped, so the last step jumps from the 20th to 0
    torch.testing.assert_close(s, torch.cat([full[:-2], full[-1:]]))
    assert s[-2] > 1.5 * SCHED.sigma_min
    assert torch.equal(SAMPLERS["DPM++ 2M"].sigmas("Karras", 20, SCHED),
                       get_sigmas("karras", 20, SCHED))


def test_scheduler_names():
    assert scheduler_key("SGM Uniform") == "sgm_uniform"
    assert scheduler_key("SGMUniform") == "sgm_uniform"
    assert scheduler_key("KL Optimal") == "kl_optimal"
    assert scheduler_key("DDIM") == "ddim_uniform"
    assert scheduler_key(None) == scheduler_key("") == scheduler_key("Automatic") == "automatic"
    assert scheduler_label("exponential") == "Exponential"
    assert scheduler_label("sgm_uniform") == "SGM Uniform"
    with pytest.raises(SdloomError, match="unknown scheduler 'fancy'.*Karras"):
        scheduler_key("fancy")
    with pytest.raises(SdloomError, match="at least 1"):
        get_sigmas("karras", 0, SCHED)
    with pytest.raises(SdloomError, match="resolve_sampler"):
        get_sigmas("automatic", 10, SCHED)


def test_karras_sigmas_is_model_free():
    s = karras_sigmas(3, 0.1, 10.0, rho=1.0)  # rho = 1 is evenly spaced in σ
    torch.testing.assert_close(s, torch.tensor([10.0, 5.05, 0.1, 0.0]))
