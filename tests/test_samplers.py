"""The samplers against diffusers' schedulers (same inputs, model outputs and noise) and against closed
forms for Gaussian data, where the optimal network is known exactly.

The oracle: for x_0 ~ N(m, s^2) per pixel,
    eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m) / (abar_t s^2 + 1 - abar_t)
with abar from the BASE schedule at the original timestep the network receives. Every sampler step is
then affine in x_t, so the mean and variance of what it produces follow from the schedule in closed form
(numpy below, from the papers' formulas), including the discretisation error of few-step samplers.
"""

import math
import runpy
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from hydra.core.global_hydra import GlobalHydra
from PIL import Image

from src.diffusion import GaussianDiffusion, SamplerOptions, SpacedDiffusion, sample
from src.diffusion.reverse_process import Trajectory, denoise_from, sample_trajectory
from src.errors import ConfigError
from src.sampling.grids import image_grid, trajectory_grid

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)  # DDPM's linear schedule
ABAR = np.cumprod(1.0 - BETAS)
M, S = 0.1, 0.2

# The sampling loops run thousands of small elementwise ops: one intra-op thread (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


def make(var_type: str = "fixed_large", betas: np.ndarray = BETAS) -> GaussianDiffusion:
    loss_type = "hybrid" if var_type == "learned_range" else "simple"
    return GaussianDiffusion(torch.from_numpy(betas), var_type=var_type, loss_type=loss_type)


def process(kept) -> dict:
    """The (respaced) process over the kept timesteps, in numpy: beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}}."""
    a = ABAR[np.asarray(kept)]
    a_prev = np.concatenate([[1.0], a[:-1]])
    b = 1.0 - a / a_prev
    b_tilde = b * (1.0 - a_prev) / (1.0 - a)
    return {
        "abar": a,
        "abar_prev": a_prev,
        "beta": b,
        "beta_tilde": b_tilde,
        "log_beta_tilde_clipped": np.log(np.concatenate([[b_tilde[1]], b_tilde[1:]])),
        "c1": b * np.sqrt(a_prev) / (1.0 - a),
        "c2": np.sqrt(1.0 - b) * (1.0 - a_prev) / (1.0 - a),
    }


def even(n: int) -> np.ndarray:
    """improved-diffusion's n evenly strided steps over [0, T): round(j (T - 1) / (n - 1))."""
    return np.arange(T) if n == T else np.array(sorted({round(j * (T - 1) / (n - 1)) for j in range(n)}))


# --- the oracle network ---------------------------------------------------------------------------
class Oracle:
    """eps* for x_0 ~ N(M, S^2); with `learned_over` (the kept timesteps) also v* in [-1, 1] such that
    learned_range gives the exact reverse variance of that process,
        Var(x_{k-1} | x_k) = beta~'_k + c1'_k^2 Var(x_0 | x_t),
        Var(x_0 | x_t) = s^2 (1 - abar) / (abar s^2 + 1 - abar).
    Records every timestep it is called with."""

    def __init__(self, learned_over=None):
        self.abar = torch.from_numpy(ABAR)
        self.calls: list[int] = []
        self.v = None
        if learned_over is not None:
            kept = np.asarray(learned_over)
            p = process(kept)
            var_x0 = S**2 * (1.0 - p["abar"]) / (p["abar"] * S**2 + 1.0 - p["abar"])
            var_star = p["beta_tilde"] + p["c1"] ** 2 * var_x0
            frac = (np.log(var_star) - p["log_beta_tilde_clipped"]) / (np.log(p["beta"]) - p["log_beta_tilde_clipped"])
            frac[0] = 0.5  # the last step adds no noise
            assert ((frac >= 0) & (frac <= 1)).all()
            self.v = torch.zeros(T, dtype=torch.float64)
            self.v[torch.from_numpy(kept)] = torch.from_numpy(2.0 * frac - 1.0)

    def __call__(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.calls.append(int(t[0]))
        a = self.abar[t].to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
        eps = torch.sqrt(1.0 - a) * (xt - torch.sqrt(a) * M) / (a * S**2 + 1.0 - a)
        if self.v is None:
            return eps
        return torch.cat([eps, self.v[t].to(xt.dtype).view_as(a).expand_as(eps)], dim=1)


def predicted_moments(
    kept, sampler: str, var: str = "fixed_large", eta: float = 0.0, x_t_moments=(0.0, 1.0)
) -> tuple[float, float]:
    """Mean and std of the sampler's output for the oracle, from x_T ~ N(0, 1): each step is
    x_{k-1} = A_k x_k + B_k + sigma_k z, so the moments propagate exactly (clipping never triggers
    for this data)."""
    p = process(kept)
    mean, variance = x_t_moments
    for k in range(len(kept) - 1, -1, -1):
        a, a_prev = p["abar"][k], p["abar_prev"][k]
        gain = S**2 * np.sqrt(a) / (a * S**2 + 1.0 - a)  # E[x_0 | x_t] = gain x_t + offset
        offset = M * (1.0 - gain * np.sqrt(a))
        if sampler == "ddpm":  # posterior mean at E[x_0 | x_t] (DDPM eq. 7)
            slope, shift = p["c1"][k] * gain + p["c2"][k], p["c1"][k] * offset
            sigma2 = {
                "fixed_small": p["beta_tilde"][k],
                "fixed_large": p["beta"][k],
                "exact": p["beta_tilde"][k] + p["c1"][k] ** 2 * S**2 * (1 - a) / (a * S**2 + 1 - a),
            }[var]
        else:  # DDIM eq. 12 with eps = (x_t - sqrt(a) x0_hat) / sqrt(1 - a)
            sigma = eta * np.sqrt((1 - a_prev) / (1 - a)) * np.sqrt(1 - a / a_prev)
            direction = np.sqrt(1 - a_prev - sigma**2) / np.sqrt(1 - a)
            slope = np.sqrt(a_prev) * gain + direction * (1 - np.sqrt(a) * gain)
            shift = np.sqrt(a_prev) * offset - direction * np.sqrt(a) * offset
            sigma2 = sigma**2
        mean, variance = slope * mean + shift, slope**2 * variance + (sigma2 if k > 0 else 0.0)
    return mean, math.sqrt(variance)


def ddim_affine_map(kept) -> tuple[float, float]:
    """DDIM eta=0 with the oracle is a deterministic affine map x_T -> slope x_T + shift."""
    mean0, _ = predicted_moments(kept, "ddim", x_t_moments=(0.0, 0.0))
    mean1, _ = predicted_moments(kept, "ddim", x_t_moments=(1.0, 0.0))
    return mean1 - mean0, mean0


SHAPE = (256, 1, 16, 16)  # 65536 pixels: standard error of the std ~ s / sqrt(2 * 65536) ~ 0.0006
MC_TOL = 0.003  # 5 standard errors


def run_oracle(diffusion, oracle, seed=0, **options) -> tuple[float, float]:
    x = sample(
        diffusion, oracle, SHAPE, SamplerOptions(**options), generator=torch.Generator().manual_seed(seed)
    ).double()
    return x.mean().item(), x.std().item()


# --- closed-form moments of the oracle samplers ------------------------------------------------------
def test_closed_form_moments_of_the_samplers():
    """What each sampler gives for Gaussian data with the optimal eps (measured, stated honestly)."""
    assert predicted_moments(even(T), "ddpm", "exact")[1] == pytest.approx(0.19975, abs=1e-5)
    assert predicted_moments(even(T), "ddpm", "fixed_large")[1] == pytest.approx(0.2009, abs=1e-4)
    assert predicted_moments(even(T), "ddpm", "fixed_small")[1] == pytest.approx(0.1963, abs=1e-4)
    # With the exact reverse variance the strided chain is exact at any step count (0.19975 instead of
    # 0.2 only because the last step adds no noise); fixed variances drift apart as steps get fewer.
    for n in (100, 50, 20):
        assert predicted_moments(even(n), "ddpm", "exact")[1] == pytest.approx(0.19975, abs=1e-5)
    assert predicted_moments(even(50), "ddpm", "fixed_small")[1] == pytest.approx(0.1584, abs=1e-4)
    assert predicted_moments(even(50), "ddpm", "fixed_large")[1] == pytest.approx(0.2253, abs=1e-4)
    # DDIM (eta=0) shrinks the spread through discretisation: 0.1985 at 1000 steps, 0.1758 at 50.
    assert predicted_moments(even(T), "ddim")[1] == pytest.approx(0.1985, abs=1e-4)
    assert predicted_moments(even(50), "ddim")[1] == pytest.approx(0.1758, abs=1e-4)
    assert predicted_moments(even(50), "ddim", eta=1.0)[1] == pytest.approx(0.1584, abs=1e-4)


def test_oracle_ddpm_1000_steps_reproduces_the_data():
    mean, std = run_oracle(make("fixed_large"), Oracle(), sampler="ddpm")
    print(f"DDPM 1000 fixed_large oracle: mean {mean:.4f} std {std:.4f}")
    assert mean == pytest.approx(M, abs=MC_TOL)
    assert std == pytest.approx(S, abs=0.005)  # closed form 0.2009: fixed_large is not the exact variance
    assert std == pytest.approx(predicted_moments(even(T), "ddpm", "fixed_large")[1], abs=MC_TOL)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large"])
def test_oracle_strided_ddpm_matches_the_closed_form(var_type):
    mean, std = run_oracle(make(var_type), Oracle(), sampler="ddpm", steps=50)
    assert mean == pytest.approx(M, abs=MC_TOL)
    assert std == pytest.approx(predicted_moments(even(50), "ddpm", var_type)[1], abs=MC_TOL)


def test_oracle_strided_50_learned_range_is_exact():
    """v* expresses the exact reverse variance of the 50-step process: the chain reproduces N(m, s^2)."""
    oracle = Oracle(learned_over=even(50))
    mean, std = run_oracle(make("learned_range"), oracle, sampler="ddpm", steps=50)
    print(f"DDPM strided 50 learned_range oracle: mean {mean:.4f} std {std:.4f}")
    assert mean == pytest.approx(M, abs=MC_TOL)
    assert std == pytest.approx(S, abs=MC_TOL)  # closed form 0.19975
    # the network saw the original timesteps, from the last kept one down to 0
    assert oracle.calls == list(even(50)[::-1])


def test_oracle_ddim_moments():
    diffusion = make()
    mean, std = run_oracle(diffusion, Oracle(), sampler="ddim", steps=50)
    print(f"DDIM 50 oracle: mean {mean:.4f} std {std:.4f}")
    assert mean == pytest.approx(M, abs=MC_TOL)
    assert std == pytest.approx(predicted_moments(even(50), "ddim")[1], abs=MC_TOL)  # 0.1758
    assert std == pytest.approx(S, abs=0.03)  # 50 DDIM steps: within 12% of s, not better
    mean, std = run_oracle(diffusion, Oracle(), sampler="ddim")
    print(f"DDIM 1000 oracle: mean {mean:.4f} std {std:.4f}")
    assert std == pytest.approx(S, abs=0.003 + MC_TOL)  # closed form 0.1985
    mean, std = run_oracle(diffusion, Oracle(), sampler="ddim", steps=50, eta=1.0)
    assert std == pytest.approx(predicted_moments(even(50), "ddim", eta=1.0)[1], abs=MC_TOL)


def test_oracle_ddim_is_the_closed_form_affine_map():
    """Pixel by pixel, not just in distribution: DDIM eta=0 maps x_T to slope x_T + shift."""
    x_t = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    for n in (20, 50):
        slope, shift = ddim_affine_map(even(n))
        out = sample(make(), Oracle(), x_t.shape, SamplerOptions("ddim", steps=n), noise=x_t)
        np.testing.assert_allclose(out.numpy(), slope * x_t.numpy() + shift, atol=2e-5)


# --- determinism ---------------------------------------------------------------------------------
def test_ddim_eta0_is_deterministic_given_x_t():
    x_t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    net = lambda x, t: torch.tanh(x) + 1e-3 * t.view(-1, 1, 1, 1)  # noqa: E731
    diffusion = make()
    ddim = SamplerOptions("ddim", steps=20)
    a = sample(diffusion, net, x_t.shape, ddim, noise=x_t, generator=torch.Generator().manual_seed(1))
    b = sample(diffusion, net, x_t.shape, ddim, noise=x_t, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b)
    c = sample(diffusion, net, x_t.shape, ddim.replace(eta=1.0), noise=x_t, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(a, c)


def test_ddpm_same_seed_same_images():
    net = lambda x, t: torch.tanh(x)  # noqa: E731
    diffusion = make()
    draw = lambda seed: sample(
        diffusion,
        net,
        (3, 1, 8, 8),
        SamplerOptions("ddpm", steps=25),  # noqa: E731
        generator=torch.Generator().manual_seed(seed),
    )
    assert torch.equal(draw(0), draw(0))
    assert not torch.allclose(draw(0), draw(1))


@pytest.mark.parametrize("steps", [None, 5])
def test_sampling_on_another_device_leaves_the_callers_diffusion_in_place(steps):
    diffusion = make(betas=np.linspace(1e-3, 0.2, 10))
    out = sample(diffusion, lambda x, t: torch.zeros_like(x), (1, 1, 4, 4), SamplerOptions(steps=steps), device="meta")
    assert out.device.type == "meta" and out.shape == (1, 1, 4, 4)
    assert diffusion.betas.device.type == "cpu"


# --- against diffusers ---------------------------------------------------------------------------
# diffusers keeps its schedule in float32, where 1 - abar_t loses ~3 digits at small t; the comparisons
# run in float64 with its schedule tensors replaced by float64 ones from the same betas.
def in_float64(scheduler):
    scheduler.betas = torch.from_numpy(BETAS)
    scheduler.alphas = 1.0 - scheduler.betas
    scheduler.alphas_cumprod = torch.from_numpy(ABAR)
    scheduler.one = torch.tensor(1.0, dtype=torch.float64)
    if hasattr(scheduler, "final_alpha_cumprod"):
        scheduler.final_alpha_cumprod = torch.tensor(1.0, dtype=torch.float64)
    return scheduler


def ddpm_scheduler(variance_type: str) -> DDPMScheduler:
    return in_float64(
        DDPMScheduler(
            num_train_timesteps=T,
            trained_betas=BETAS,
            variance_type=variance_type,
            clip_sample=True,
            clip_sample_range=1.0,
            prediction_type="epsilon",
        )
    )


def ddim_scheduler(steps_offset: int = 0) -> DDIMScheduler:
    return in_float64(
        DDIMScheduler(
            num_train_timesteps=T,
            trained_betas=BETAS,
            clip_sample=True,
            set_alpha_to_one=True,
            steps_offset=steps_offset,
            timestep_spacing="leading",
            prediction_type="epsilon",
        )
    )


def inputs(seed: int, channels_out: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    out = torch.randn(4, channels_out, 6, 6, generator=g, dtype=torch.float64)
    if channels_out == 6:  # learned_range: v in [-1, 1]
        out[:, 3:] = torch.tanh(out[:, 3:])
    return x, out


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
@pytest.mark.parametrize("t", [0, 1, 2, 10, 500, 998, 999])
def test_p_sample_matches_diffusers_ddpm_step(var_type, t):
    """Same sample, model output (with clipping of x_0 triggered) and noise: diffusers draws its noise
    with randn_tensor(shape, generator) on CPU, i.e. torch.randn with the same generator."""
    x, out = inputs(t, 6 if var_type == "learned_range" else 3)
    theirs = ddpm_scheduler(var_type).step(out, t, x, generator=torch.Generator().manual_seed(7))
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = make(var_type).p_sample(lambda xt, tt: out, x, torch.full((4,), t), z)
    np.testing.assert_allclose(ours["pred_x0"].numpy(), theirs.pred_original_sample.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours["sample"].numpy(), theirs.prev_sample.numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_variances_match_diffusers_get_variance(var_type):
    scheduler = ddpm_scheduler(var_type)
    diffusion = make(var_type)
    v = torch.linspace(-1, 1, 5, dtype=torch.float64).view(5, 1, 1, 1)
    for t in [1, 2, 3, 100, 999]:
        theirs = scheduler._get_variance(t, predicted_variance=v)
        out = torch.cat([torch.zeros_like(v), v], dim=1) if var_type == "learned_range" else torch.zeros_like(v)
        ours = diffusion.p_mean_variance_from_output(out, torch.zeros_like(v), torch.full((5,), t))
        if var_type == "learned_range":  # diffusers returns the log variance here
            np.testing.assert_allclose(ours["log_variance"].numpy(), theirs.numpy(), rtol=1e-12)
        else:
            np.testing.assert_allclose(ours["variance"][:, 0].numpy().ravel(), theirs.expand(5).numpy(), rtol=1e-12)


def test_fixed_large_differs_from_diffusers_only_at_t0():
    """At t=0 diffusers' fixed_large is beta_0 while ours is beta~_1 (improved-diffusion's choice, so the
    decoder likelihood stays finite). The last step adds no noise in either, so samples agree."""
    theirs = ddpm_scheduler("fixed_large")._get_variance(0).item()
    ours = (
        make("fixed_large")
        .p_mean_variance_from_output(
            torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), torch.zeros(1, dtype=torch.long)
        )["variance"]
        .item()
    )
    assert theirs == pytest.approx(BETAS[0], rel=1e-12)
    assert ours == pytest.approx(BETAS[1] * (1 - ABAR[0]) / (1 - ABAR[1]), rel=1e-9)


def smooth_net(channels_out: int = 3):
    """A deterministic stand-in network of x and t (v in [-1, 1] for learned_range)."""

    def net(x, t):
        tt = t.to(x.dtype).view(-1, 1, 1, 1) / T
        eps = torch.tanh(1.5 * x) * (0.5 + tt) + 0.2 * torch.sin(3 * tt)
        return torch.cat([eps, torch.tanh(x - tt)], dim=1) if channels_out == 6 else eps

    return net


@pytest.mark.parametrize("var_type", ["fixed_small", "fixed_large", "learned_range"])
def test_strided_ddpm_loop_matches_diffusers(var_type):
    """DDPMScheduler.set_timesteps(20) (leading, steps_offset 0) respaces the betas from alphas_cumprod
    at its timesteps; a whole run with the same generator must give the same images. (With
    steps_offset=1 its last timestep is 1 > 0 and it still adds noise there, sqrt(1 - abar_1) ~ 0.017 for
    fixed_large; ours adds none at the last step, as DDPM Algorithm 2.)"""
    scheduler = ddpm_scheduler(var_type)
    scheduler.set_timesteps(20)
    timesteps = scheduler.timesteps.tolist()
    net = smooth_net(6 if var_type == "learned_range" else 3)
    x_t = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    g, x = torch.Generator().manual_seed(1), x_t.clone()
    for t in scheduler.timesteps:
        x = scheduler.step(net(x, t.view(1).expand(x.shape[0])), t, x, generator=g).prev_sample
    seen = []
    ours = sample(
        make(var_type),
        lambda xt, t: (seen.append(int(t[0])), net(xt, t))[1],
        x_t.shape,
        SamplerOptions("ddpm", spacing=timesteps),
        noise=x_t,
        generator=torch.Generator().manual_seed(1),
    )
    assert seen == timesteps  # the network gets the original timesteps
    np.testing.assert_allclose(ours.numpy(), x.clamp(-1, 1).numpy(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_loop_matches_diffusers(eta, steps_offset):
    """DDIMScheduler(clip_sample=True, set_alpha_to_one=True, timestep_spacing="leading") with
    set_timesteps(25): our spacing is its timestep list, its prev timestep t - T // S is our previous kept
    step and abar = 1 after the last. We re-derive eps from the clipped x_0 (improved-diffusion, GLIDE):
    diffusers' use_clipped_model_output=True."""
    scheduler = ddim_scheduler(steps_offset)
    scheduler.set_timesteps(25)
    timesteps = scheduler.timesteps.tolist()
    assert timesteps == list(range(steps_offset, T, 40))[::-1]
    net = smooth_net()
    x_t = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    g, x = torch.Generator().manual_seed(1), x_t.clone()
    for t in scheduler.timesteps:
        # our sampler draws the step noise only when eta > 0, with the generator, every step
        z = torch.randn(x.shape, generator=g, dtype=x.dtype) if eta > 0 else None
        x = scheduler.step(
            net(x, t.view(1).expand(x.shape[0])), t, x, eta=eta, use_clipped_model_output=True, variance_noise=z
        ).prev_sample
    ours = sample(
        make(),
        net,
        x_t.shape,
        SamplerOptions("ddim", eta=eta, spacing=timesteps),
        noise=x_t,
        generator=torch.Generator().manual_seed(1),
    )
    np.testing.assert_allclose(ours.numpy(), x.clamp(-1, 1).numpy(), rtol=1e-10, atol=1e-12)


def test_ddim_step_matches_diffusers_with_clipping():
    """One step where clipping bites, at several timesteps, with injected noise."""
    scheduler = ddim_scheduler()
    scheduler.set_timesteps(50)
    kept = sorted(scheduler.timesteps.tolist())
    spaced = SpacedDiffusion(make(), kept)
    for k in [0, 1, 25, 49]:
        x, out = inputs(k)
        z = torch.randn(x.shape, generator=torch.Generator().manual_seed(k), dtype=torch.float64)
        theirs = scheduler.step(out, kept[k], x, eta=0.5, use_clipped_model_output=True, variance_noise=z)
        ours = spaced.ddim_step(lambda xt, tt: out, x, torch.full((4,), k), z, eta=0.5)
        assert (ours["pred_x0"].abs() == 1).any()  # clipping took part
        np.testing.assert_allclose(ours["pred_x0"].numpy(), theirs.pred_original_sample.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours["sample"].numpy(), theirs.prev_sample.numpy(), rtol=1e-10, atol=1e-12)


# --- trajectories --------------------------------------------------------------------------------
def test_trajectory_records_and_matches_sample():
    diffusion, net = make(), smooth_net(1)
    options = SamplerOptions("ddpm", steps=30)
    plain = sample(diffusion, net, (3, 1, 8, 8), options, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectory(
        diffusion, net, (3, 1, 8, 8), options, record_every=10, generator=torch.Generator().manual_seed(0)
    )
    assert isinstance(traj, Trajectory)
    assert torch.equal(traj.sample, plain)  # recording changes nothing
    assert traj.xt.shape == traj.pred_x0.shape == (3, 4, 1, 8, 8)  # steps 1, 11, 21 and 30 of 30
    assert torch.equal(traj.xt[:, -1], traj.sample)
    kept = [round(j * 999 / 29) for j in range(30)]
    assert traj.timesteps == [kept[29], kept[19], kept[9], kept[0]]  # the n-th step runs at kept[30 - n]

    default = sample_trajectory(diffusion, net, (2, 1, 8, 8), SamplerOptions("ddim", steps=25))
    assert default.xt.shape[1] == 10 and default.timesteps[0] == 999 and default.timesteps[-1] == 0
    chosen = sample_trajectory(
        diffusion,
        net,
        (2, 1, 8, 8),
        SamplerOptions("ddim", steps=25),
        record_timesteps=[kept_t := round(24 * 999 / 24), 0],
    )
    assert chosen.timesteps == [kept_t, 0]
    with pytest.raises(ValueError, match="not among the sampled timesteps"):
        sample_trajectory(diffusion, net, (2, 1, 8, 8), SamplerOptions(steps=25), record_timesteps=[501])
    with pytest.raises(ValueError, match="not both"):
        sample_trajectory(diffusion, net, (2, 1, 8, 8), SamplerOptions(steps=25), record_every=2, record_timesteps=[0])


def test_trajectory_grid_rows_are_samples_columns_are_steps():
    traj = sample_trajectory(make(), smooth_net(1), (3, 1, 8, 8), SamplerOptions(steps=10), record_every=3)
    assert traj.xt.shape[1] == 4  # steps 1, 4, 7, 10
    grid = trajectory_grid(traj, "pred_x0", padding=2)
    assert grid.shape == (3, 3 * (8 + 2) + 2, 4 * (8 + 2) + 2)  # make_grid repeats 1 channel to RGB
    assert 0.0 <= grid.min() and grid.max() <= 1.0
    # cell (row 1, column 2) is sample 1 at the third recorded step
    cell = grid[0, 2 + 1 * 10 : 2 + 1 * 10 + 8, 2 + 2 * 10 : 2 + 2 * 10 + 8]
    np.testing.assert_allclose(cell.numpy(), ((traj.pred_x0[1, 2, 0].clamp(-1, 1) + 1) / 2).numpy(), atol=1e-6)
    assert image_grid(traj.sample, nrow=3).shape == (3, 12, 32)
    with pytest.raises(ValueError):
        trajectory_grid(traj, "x0")


def test_denoise_from_t_visits_steps_up_to_t():
    oracle = Oracle()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    denoise_from(make(), oracle, x, 300, SamplerOptions("ddim", steps=7))
    assert oracle.calls == [300, 250, 200, 150, 100, 50, 0]
    oracle.calls.clear()
    denoise_from(make(), oracle, x, 4)
    assert oracle.calls == [4, 3, 2, 1, 0]
    # from T - 1 with a seed it is `sample` from that x_T
    a = denoise_from(
        make(), smooth_net(1), x, T - 1, SamplerOptions(steps=10), generator=torch.Generator().manual_seed(5)
    )
    b = sample(
        make(), smooth_net(1), x.shape, SamplerOptions(steps=10), noise=x, generator=torch.Generator().manual_seed(5)
    )
    assert torch.equal(a, b)
    oracle.calls.clear()
    denoise_from(make(), oracle, x, T - 1, SamplerOptions("ddim", spacing="ddim10"))  # from noise DDIM starts at 900
    assert oracle.calls == list(range(900, -1, -100))
    with pytest.raises(ValueError, match="ends at"):
        denoise_from(make(), oracle, x, 300, SamplerOptions(spacing="ddim7"))
    with pytest.raises(ValueError, match="t must be in"):
        denoise_from(make(), oracle, x, T)


# --- the sample.py command ------------------------------------------------------------------------
REPO = Path(__file__).resolve().parents[1]


def write_checkpoint(compose_train, path: Path) -> Path:
    """A tiny untrained run (T=50) saved as train.py's checkpoints are: state_dict + run_config."""
    from src.builders import build_module

    cfg = compose_train()
    module = build_module(cfg, channels=1, image_size=16)
    torch.save(
        {
            "state_dict": module.state_dict(),
            "global_step": 0,
            "hyper_parameters": {"run_config": module.hparams["run_config"]},
        },
        path,
    )
    return path


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_sample_command_writes_each_mode(compose_train, compose_sample, tmp_path):
    import sample as sample_command

    ckpt = write_checkpoint(compose_train, tmp_path / "last.ckpt")
    common = [f"ckpt_path={ckpt}", "device=cpu", "seed=1", "min_image_size=null"]  # PNGs at the images' own size
    cases = {
        "grid": (["mode=grid", "num_samples=4", "sampler=ddim", "steps=3"], {"samples": (3, 2 + 2 * 18, 2 + 2 * 18)}),
        "trajectory": (
            ["mode=trajectory", "num_samples=2", "steps=4", "trajectory.record_every=2"],
            {"pred_x0": (3, 2 + 2 * 18, 2 + 3 * 18), "xt": (3, 2 + 2 * 18, 2 + 3 * 18)},
        ),
        "interpolate": (
            ["mode=interpolate", "num_samples=2", "interpolate.num_lambdas=3", "interpolate.t=20", "steps=3"],
            {"interpolate": (3, 2 + 2 * 18, 2 + 5 * 18)},
        ),
        "interpolate_ddim": (
            [
                "mode=interpolate",
                "num_samples=2",
                "interpolate.num_lambdas=3",
                "interpolate.encoder=ddim",
                "interpolate.method=slerp",
                "sampler=ddim",
                "steps=3",
            ],
            {"interpolate": (3, 2 + 2 * 18, 2 + 5 * 18)},
        ),
        "invert": (
            ["mode=invert", "num_samples=2", "sampler=ddim", "steps=3"],
            {"invert": (3, 2 + 2 * 18, 2 + 3 * 18)},
        ),
    }
    for name, (overrides, expected) in cases.items():
        written = sample_command.run(compose_sample(*common, *overrides, output_dir=tmp_path / name))
        assert set(written) == set(expected), name
        for key, shape in expected.items():
            assert written[key].parent == tmp_path / name and written[key].suffix == ".png"
            image = read_png(written[key])
            assert (3, *image.shape[:2]) == shape, (name, key)

    # the same seed gives the same grid
    again = sample_command.run(compose_sample(*common, *cases["grid"][0], output_dir=tmp_path / "again"))
    assert np.array_equal(read_png(again["samples"]), read_png(tmp_path / "grid" / "samples.png"))
    for overrides, message in [
        (["mode=video"], "unknown mode"),
        (["mode=interpolate", "interpolate.t=20", "steps=50"], r"must be in \[1, 21\]"),
        (["spacing=ddim11"], "exactly 11 equally strided steps"),
        (["mode=interpolate", "interpolate.method=cubic"], "unknown interpolate.method"),
    ]:
        with pytest.raises(ConfigError, match=message):
            sample_command.run(compose_sample(*common, *overrides, output_dir=tmp_path / "bad"))


@pytest.mark.slow
def test_sample_command_compiled_network_draws_the_eager_grid(compose_train, compose_sample, tmp_path):
    from torch._dynamo.utils import counters

    import sample as sample_command

    ckpt = write_checkpoint(compose_train, tmp_path / "last.ckpt")
    common = [f"ckpt_path={ckpt}", "device=cpu", "seed=1", "mode=grid", "num_samples=4", "sampler=ddim", "steps=3"]
    eager = sample_command.run(compose_sample(*common, output_dir=tmp_path / "eager"))["samples"]
    counters.clear()
    compiled = sample_command.run(compose_sample(*common, "compile=true", output_dir=tmp_path / "compiled"))["samples"]
    assert counters["stats"]["unique_graphs"] >= 1  # the network really ran through torch.compile
    # inductor's kernels round differently from eager ones; after 3 steps that is at most one uint8 level
    difference = np.abs(read_png(compiled).astype(int) - read_png(eager).astype(int))
    assert difference.max() <= 1 and difference.mean() < 0.05
    with pytest.raises(ConfigError, match="compile must be false, true or one of"):
        sample_command.run(compose_sample(*common, "compile=fast", output_dir=tmp_path / "bad"))


@pytest.mark.slow
def test_sample_command_missing_checkpoint_is_one_line(tmp_path, monkeypatch, capsys):
    script = str(REPO / "sample.py")
    for args, message in [
        ([], "error: ckpt_path is required"),
        ([f"ckpt_path={tmp_path / 'nope.ckpt'}"], "error: checkpoint not found"),
    ]:
        monkeypatch.setattr(sys, "argv", [script, *args, f"hydra.run.dir={tmp_path / 'run'}"])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(script, run_name="__main__")  # as `python sample.py ...`, in this process
        GlobalHydra.instance().clear()
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(message) and len(err.splitlines()) == 1, err


@pytest.mark.slow
def test_small_images_are_enlarged_pixel_by_pixel_in_the_grids(compose_train, compose_sample, tmp_path):
    import sample as sample_command

    ckpt = write_checkpoint(compose_train, tmp_path / "last.ckpt")
    common = [f"ckpt_path={ckpt}", "device=cpu", "seed=1", "mode=grid", "num_samples=4", "sampler=ddim", "steps=2"]
    raw = read_png(
        sample_command.run(compose_sample(*common, "min_image_size=null", output_dir=tmp_path / "raw"))["samples"]
    )
    shown = read_png(sample_command.run(compose_sample(*common, output_dir=tmp_path / "shown"))["samples"])
    # 16 px images, at least 64 px shown: every pixel of the raw grid becomes a 4 x 4 block
    assert shown.shape == (4 * raw.shape[0], 4 * raw.shape[1], 3)
    np.testing.assert_array_equal(shown, raw.repeat(4, axis=0).repeat(4, axis=1))
    odd = read_png(
        sample_command.run(compose_sample(*common, "min_image_size=40", output_dir=tmp_path / "odd"))["samples"]
    )
    assert odd.shape[0] == 3 * raw.shape[0]  # ceil(40 / 16): whole blocks only
