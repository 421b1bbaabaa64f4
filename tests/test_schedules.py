"""Beta schedules against diffusers' DDPMScheduler and the closed forms of the papers."""

import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from src.diffusion import GaussianDiffusion, make_beta_schedule

# diffusers names for our schedules (its "squaredcos_cap_v2" is the improved-DDPM cosine schedule).
DIFFUSERS_NAMES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}
T = 1000


def reference_scheduler(name: str) -> DDPMScheduler:
    return DDPMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4,
        beta_end=0.02,
        beta_schedule=DIFFUSERS_NAMES[name],
        variance_type="fixed_small",
    )


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_betas_match_diffusers(name):
    betas = make_beta_schedule(name, T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    ref = reference_scheduler(name).betas.double().numpy()
    # diffusers stores float32 betas: agreement to float32 rounding (2^-24 ~ 6e-8 relative).
    np.testing.assert_allclose(betas.numpy(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alphas_cumprod_match_diffusers(name):
    abar = GaussianDiffusion(make_beta_schedule(name, T), var_type="fixed_small").alphas_cumprod
    assert abar.dtype == torch.float64
    ref = reference_scheduler(name).alphas_cumprod.double().numpy()
    # A float32 cumulative product of 1000 terms accumulates ~1e-7..1e-6 relative error.
    np.testing.assert_allclose(abar[:-1].numpy(), ref[:-1], rtol=1e-6, atol=0)
    # The last cosine step is clipped at beta=0.999, and 1 - 0.999 in float32 is only good to ~1.3e-5
    # relative; the linear schedule has no such step.
    last_rtol = 2e-5 if name == "cosine" else 1e-6
    np.testing.assert_allclose(abar[-1].item(), ref[-1], rtol=last_rtol, atol=0)
    # And, independently of diffusers, the float64 closed form prod_{s<=t}(1 - beta_s).
    betas = make_beta_schedule(name, T).numpy()
    np.testing.assert_allclose(abar.numpy(), np.cumprod(1.0 - betas), rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_posterior_variance_matches_diffusers(name):
    diffusion = GaussianDiffusion(make_beta_schedule(name, T), var_type="fixed_small")
    ours = diffusion.posterior_variance.numpy()
    sched = reference_scheduler(name)
    # Our t is 0-based like diffusers' (t=0 is the first noising step, previous_timestep(0) = -1).
    ref32 = np.array([sched._get_variance(t).item() for t in range(T)])
    # diffusers clamps the variance at 1e-20 where beta~ is exactly 0 (the first step); ours is 0 there.
    assert ref32[0] == pytest.approx(1e-20, rel=1e-6)
    assert ours[0] == 0.0
    # diffusers recomputes beta_t = 1 - abar_t / abar_{t-1} in float32, which cancels catastrophically
    # for beta ~ 1e-4 (6e-8 / 1e-4 ~ 6e-4 relative): compare at that precision.
    np.testing.assert_allclose(ours[1:], ref32[1:], rtol=2e-3, atol=0)
    # The same diffusers formula evaluated in float64 (its own float32 betas, cumprod in float64)
    # agrees to the float32 rounding of the betas.
    sched.alphas_cumprod = torch.cumprod(1.0 - sched.betas.double(), dim=0)
    sched.one = torch.tensor(1.0, dtype=torch.float64)
    ref64 = np.array([sched._get_variance(t).item() for t in range(T)])
    np.testing.assert_allclose(ours[1:], ref64[1:], rtol=1e-6, atol=0)
    # At t=0 the clipped log variance is log beta~ of the next step (finite), not log 0.
    clipped = diffusion.posterior_log_variance_clipped.numpy()
    # (Compared in log space with an absolute tolerance, i.e. 1e-6 relative in the variance.)
    assert clipped[0] == pytest.approx(math.log(ref64[1]), abs=1e-6)
    np.testing.assert_allclose(clipped[1:], np.log(ref64[1:]), rtol=0, atol=1e-6)


def test_linear_schedule_scales_with_num_timesteps():
    # Both ends are scaled by 1000/T: at T=4000 the schedule is linspace(0.25e-4, 0.005).
    betas = make_beta_schedule("linear", 4000)
    assert betas.dtype == torch.float64 and betas.shape == (4000,)
    np.testing.assert_allclose(betas.numpy(), np.linspace(0.25e-4, 0.005, 4000), rtol=1e-12, atol=0)
    np.testing.assert_allclose(
        make_beta_schedule("linear", 1000).numpy(), np.linspace(1e-4, 0.02, 1000), rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("num_timesteps", [50, 1000, 4000])
def test_cosine_schedule_closed_form(num_timesteps):
    betas = make_beta_schedule("cosine", num_timesteps)
    assert betas.dtype == torch.float64
    assert float(betas.max()) <= 0.999
    assert float(betas.min()) > 0.0
    # Nichol & Dhariwal eq. 17: abar(t) = f(t)/f(0), f(t) = cos^2(((t/T + s)/(1 + s)) pi/2), s = 0.008.
    s = 0.008
    f = np.cos((np.arange(num_timesteps + 1) / num_timesteps + s) / (1 + s) * np.pi / 2) ** 2
    expected = np.minimum(1.0 - f[1:] / f[:-1], 0.999)
    np.testing.assert_allclose(betas.numpy(), expected, rtol=1e-10, atol=1e-15)
    # The clip binds at the last step (abar(T) = 0 would make beta_T = 1).
    assert betas[-1].item() == pytest.approx(0.999)
    # Without clipping, abar_t is f(t)/f(0) exactly.
    abar = np.cumprod(1.0 - betas.numpy())
    np.testing.assert_allclose(abar[:-1], (f[1:] / f[0])[:-1], rtol=1e-9)


def test_unknown_schedule_lists_choices():
    with pytest.raises(ValueError, match="linear") as excinfo:
        make_beta_schedule("quadratic", 1000)
    assert "cosine" in str(excinfo.value) and "quadratic" in str(excinfo.value)
