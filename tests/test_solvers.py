"""The fast samplers (DPM-Solver++, UniPC, EDM Euler / Heun) against diffusers' schedulers and EDM's reference
sampler (same network, same x_T, same noise), and against the Gaussian oracle, where the exact eps is known.

The oracle: for x_0 ~ N(m, s^2) per pixel, eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m) /
(abar_t s^2 + 1 - abar_t), here with abar at any (also fractional) t from lambda_t interpolated linearly in t,
computed in numpy from the betas. Every ODE solver step is then affine in x, so a run maps x_T to
slope x_T + shift: from x_T ~ N(0, 1) the samples have mean `shift` and std |slope| exactly, with no Monte
Carlo error; the SDE samplers add sum_k c_k z_k, whose c_k come from runs with a single unit noise.

diffusers keeps sigmas in float32 (and the Euler / DPM-Solver steps compute in float32); we run ours in
float64 and compare the states before `sample`'s final clamp within 1e-4 (measured: 8e-9 .. 4e-6, run with -s
to see each).
"""

import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from src.diffusion import (
    SAMPLERS,
    GaussianDiffusion,
    Guidance,
    SamplerOptions,
    make_beta_schedule,
    sample,
    space_timesteps,
)
from src.diffusion.guidance import NO_GUIDANCE
from src.diffusion.respace import log_snr, log_snr_grid
from src.diffusion.reverse_process import (
    _reverse,
    check_options,
    denoise_from,
    generator_randn_like,
    process_for,
    sample_trajectory,
    visited_timesteps,
)
from src.diffusion.solvers import SolverSchedule
from src.errors import ConfigError

T = 1000
SCHEDULES = {"linear": np.linspace(1e-4, 0.02, T), "cosine": make_beta_schedule("cosine", T).numpy()}
M, S = 0.1, 0.2
TOL = 1e-4
SOLVERS = ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "euler", "heun"]
# Heun's diffusers constructor calls set_timesteps, where numpy 2 warns about torch's __array__ (not ours).
TORCH_ARRAY_WARNING = "ignore:__array__ implementation doesn't accept a copy keyword:DeprecationWarning"

pytestmark = pytest.mark.usefixtures("single_thread")


def make(schedule: str = "linear", mean_type: str = "eps", var_type: str = "fixed_large") -> GaussianDiffusion:
    loss_type = "hybrid" if var_type == "learned_range" else "simple"
    return GaussianDiffusion(
        torch.from_numpy(SCHEDULES[schedule]), mean_type=mean_type, var_type=var_type, loss_type=loss_type
    )


def abar_at(schedule: str, t: torch.Tensor) -> torch.Tensor:
    """abar at (fractional) timesteps t [N] -> [N, 1, 1, 1]: sigmoid(2 lambda_t), lambda linear in t."""
    abar = np.cumprod(1.0 - SCHEDULES[schedule])
    table = 0.5 * np.log(abar / (1.0 - abar))
    lam = np.interp(t.detach().double().cpu().numpy(), np.arange(T), table)
    return torch.sigmoid(2.0 * torch.from_numpy(lam)).view(-1, 1, 1, 1)


class Oracle:
    """eps* of N(M, S^2) data at any timestep; with channels_out=2C a constant v for a learned variance (which
    the solvers must ignore). Records the timesteps it is called with."""

    def __init__(self, schedule: str = "linear", channels_out: int | None = None):
        self.schedule, self.channels_out, self.calls = schedule, channels_out, []

    def __call__(self, x, t):
        self.calls.append(t[0].item())
        a = abar_at(self.schedule, t).to(x.dtype)
        eps = torch.sqrt(1 - a) * (x - torch.sqrt(a) * M) / (a * S**2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, 0.3)], dim=1) if self.channels_out else eps


def fixed_net(schedule: str, overshoot: float = 0.0, channels_out: int = 3):
    """A fixed smooth non-linear eps network: the oracle's x_0 guess plus a ripple in x and t; `overshoot`
    adds overshoot * t / T * sign(x) to x_0 (past [-1, 1] at high noise, so clipping bites, and 0 at t = 0)."""

    def net(x, t):
        a = abar_at(schedule, t).to(x.dtype)
        tt = t.to(x.dtype).view(-1, 1, 1, 1) / T
        ripple = 0.05 * torch.sin(3 * x + 5 * tt) + overshoot * tt * torch.tanh(10 * x)
        x0 = M + S**2 * a.sqrt() / (a * S**2 + 1 - a) * (x - a.sqrt() * M) + ripple
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return torch.cat([eps, torch.tanh(x)], dim=1) if channels_out == 6 else eps

    return net


def rounding(net):
    """The network of a run that only ever sees training timesteps (as diffusers calls it for Karras / logSNR
    placements of its multistep solvers, which round the timestep but not the sigma)."""
    return lambda x, t: net(x, t.round())


def x_T(seed: int = 0) -> torch.Tensor:
    return torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# --- diffusers -------------------------------------------------------------------------------------
def scheduler(cls, schedule: str, **config):
    s = cls(num_train_timesteps=T, trained_betas=SCHEDULES[schedule], **config)
    # float64 alphas_cumprod for set_timesteps's sigmas (an ndarray: np.array() of a tensor warns on numpy 2)
    s.alphas_cumprod = np.cumprod(1.0 - SCHEDULES[schedule])
    return s


def run_diffusers(s, x, net, *, edm: bool = False, noises=None) -> torch.Tensor:
    """diffusers' pipeline loop from the VP state x_T; Euler / Heun work in x / alpha = x sqrt(1 + sigma^2)."""
    if edm:
        x = x * math.sqrt(1.0 + float(s.sigmas[0]) ** 2)
    for i, t in enumerate(s.timesteps):
        out = net(s.scale_model_input(x, t), t.expand(x.shape[0]))
        kwargs = {} if noises is None else {"variance_noise": noises[i]}
        x = s.step(out, t, x, **kwargs).prev_sample
    return x


def run_ours(diffusion, net, options, x, seed: int | None = None, guidance=NO_GUIDANCE) -> torch.Tensor:
    """`sample`'s reverse run from x_T = x, before its final clamp to [-1, 1] (so nothing hides behind it)."""
    seeded = lambda: None if seed is None else torch.Generator().manual_seed(seed)  # noqa: E731
    out = _reverse(
        process_for(diffusion, options),
        net,
        x,
        options,
        guidance,
        randn_like=generator_randn_like(seeded()),
        model_kwargs=None,
        progress=False,
    )
    drawn = sample(diffusion, net, x.shape, options, guidance, noise=x, generator=seeded())
    assert torch.equal(out.clamp(-1, 1), drawn)
    return out


def compare(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return (ours - theirs).abs().max().item()


MULTISTEP_CASES = {
    # name: (our sampler, order, diffusers class, its config)
    "dpmpp_2m": ("dpmpp_2m", None, DPMSolverMultistepScheduler, dict(solver_order=2)),
    "dpmpp_3m": ("dpmpp_3m", None, DPMSolverMultistepScheduler, dict(solver_order=3)),
    "unipc2": ("unipc", 2, UniPCMultistepScheduler, dict(solver_order=2, solver_type="bh2")),
    "unipc3": ("unipc", 3, UniPCMultistepScheduler, dict(solver_order=3, solver_type="bh2")),
}


@pytest.mark.parametrize("case", list(MULTISTEP_CASES))
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 20])
@pytest.mark.parametrize("spacing", ["linspace", "trailing"])
def test_multistep_solvers_match_diffusers(case, schedule, steps, spacing):
    """Our linspaceN / trailingN are diffusers' timestep_spacing "linspace" / "trailing" (final sigma 0,
    lower-order final steps); the solvers agree step for step."""
    sampler, order, cls, config = MULTISTEP_CASES[case]
    s = scheduler(cls, schedule, timestep_spacing=spacing, **config)
    s.set_timesteps(steps)
    options = SamplerOptions(sampler, spacing=f"{spacing}{steps}", order=order, clip_denoised=False)
    assert options.timesteps(T) == sorted(s.timesteps.tolist())
    net, x = fixed_net(schedule), x_T()
    diff = compare(run_ours(make(schedule), net, options, x), run_diffusers(s, x, net))
    print(f"{case} {schedule} {spacing}{steps}: max |ours - diffusers| = {diff:.1e}")
    assert diff < TOL


PLACEMENTS = {"karras": dict(use_karras_sigmas=True), "logsnr": dict(use_lu_lambdas=True)}


@pytest.mark.parametrize(
    "case, spacing", [(case, "karras") for case in MULTISTEP_CASES] + [("dpmpp_2m", "logsnr"), ("dpmpp_3m", "logsnr")]
)
@pytest.mark.parametrize("steps", [10, 20])
def test_multistep_solvers_between_training_steps_match_diffusers(case, spacing, steps):
    """Karras sigmas and uniform logSNR: the same noise levels as diffusers'. diffusers rounds the timestep the
    network sees (not the sigma), we pass the fractional one: a network that rounds t makes them comparable.
    (UniPC has no uniform-logSNR option; cosine with Karras breaks diffusers' DPM-Solver index when the two
    noisiest levels round to the same timestep, so these run on the linear schedule.)"""
    sampler, order, cls, base = MULTISTEP_CASES[case]
    s = scheduler(cls, "linear", **base, **PLACEMENTS[spacing])
    s.set_timesteps(steps)
    options = SamplerOptions(sampler, spacing=spacing, steps=steps, order=order, clip_denoised=False)
    schedule = process_for(make(), options)
    np.testing.assert_allclose([lv.noise for lv in schedule.levels][::-1], s.sigmas[:-1].numpy(), rtol=1e-6)
    net, x = rounding(fixed_net("linear")), x_T()
    diff = compare(run_ours(make(), net, options, x), run_diffusers(s, x, net))
    print(f"{case} linear {spacing}{steps}: max |ours - diffusers| = {diff:.1e}")
    assert diff < TOL


@pytest.mark.parametrize("case", list(MULTISTEP_CASES))
def test_clipping_is_diffusers_thresholding_at_ratio_one(case):
    """clip_denoised clips x_theta to [-1, 1]: diffusers' thresholding with sample_max_value=1 (the quantile is
    clamped to [1, 1])."""
    sampler, order, cls, config = MULTISTEP_CASES[case]
    s = scheduler(cls, "linear", thresholding=True, sample_max_value=1.0, **config)
    s.set_timesteps(10)
    net, x = fixed_net("linear", overshoot=3.0), x_T(1)
    ours = run_ours(make(), net, SamplerOptions(sampler, spacing="linspace10", order=order), x)
    unclipped = run_ours(
        make(), net, SamplerOptions(sampler, spacing="linspace10", order=order, clip_denoised=False), x
    )
    assert (ours - unclipped).abs().max() > 0.01  # clipping changed the run
    diff = compare(ours, run_diffusers(s, x, net))
    print(f"{case} linear linspace10 clipped: max |ours - diffusers| = {diff:.1e}")
    assert diff < TOL


def test_learned_variance_channels_are_ignored_as_in_diffusers():
    s = scheduler(DPMSolverMultistepScheduler, "linear", solver_order=2, variance_type="learned_range")
    s.set_timesteps(10)
    net, x = fixed_net("linear", channels_out=6), x_T()
    ours = run_ours(
        make(var_type="learned_range"), net, SamplerOptions("dpmpp_2m", spacing="linspace10", clip_denoised=False), x
    )
    assert compare(ours, run_diffusers(s, x, net)) < TOL


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 20])
def test_sde_dpmpp_2m_matches_diffusers_with_the_same_noise(schedule, steps):
    """Our step draws its noise with randn_like (not at the last step, which adds none); diffusers takes it
    as variance_noise."""
    s = scheduler(DPMSolverMultistepScheduler, schedule, solver_order=2, algorithm_type="sde-dpmsolver++")
    s.set_timesteps(steps)
    net, x = fixed_net(schedule), x_T()
    g = torch.Generator().manual_seed(3)
    noises = [torch.randn(x.shape, generator=g, dtype=x.dtype) for _ in range(steps - 1)] + [torch.zeros_like(x)]
    ours = run_ours(
        make(schedule), net, SamplerOptions("dpmpp_2m_sde", spacing=f"linspace{steps}", clip_denoised=False), x, seed=3
    )
    diff = compare(ours, run_diffusers(s, x, net, noises=noises))
    print(f"dpmpp_2m_sde {schedule} linspace{steps}: max |ours - diffusers| = {diff:.1e}")
    assert diff < TOL


EDM_CASES = {"euler": EulerDiscreteScheduler, "heun": HeunDiscreteScheduler}


@pytest.mark.filterwarnings(TORCH_ARRAY_WARNING)
@pytest.mark.parametrize("sampler", list(EDM_CASES))
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("steps", [10, 20])
def test_euler_and_heun_match_diffusers_on_karras_sigmas(sampler, schedule, steps):
    """use_karras_sigmas=True: diffusers calls the network at the fractional timestep of each sigma, as we do."""
    s = scheduler(EDM_CASES[sampler], schedule, use_karras_sigmas=True)
    s.set_timesteps(steps)
    options = SamplerOptions(sampler, steps=steps, clip_denoised=False)  # karras: their default placement
    assert options.nfe(T) == len(s.timesteps) == (2 * steps - 1 if sampler == "heun" else steps)
    net, x = fixed_net(schedule), x_T()
    diff = compare(run_ours(make(schedule), net, options, x), run_diffusers(s, x, net, edm=True))
    print(f"{sampler} {schedule} karras{steps}: max |ours - diffusers| = {diff:.1e}")
    assert diff < TOL


@pytest.mark.filterwarnings(TORCH_ARRAY_WARNING)
@pytest.mark.parametrize("sampler", list(EDM_CASES))
@pytest.mark.parametrize("steps", [10, 20])
def test_euler_and_heun_match_diffusers_at_training_timesteps(sampler, steps):
    """Custom timesteps (our trailingN; diffusers then takes the sigmas at those training steps). On the cosine
    schedule diffusers' float32 state at sigma_max ~ 2e4 costs ~1e-4 after the first step, so linear only."""
    options = SamplerOptions(sampler, spacing=f"trailing{steps}", clip_denoised=False)
    s = scheduler(EDM_CASES[sampler], "linear")
    s.set_timesteps(timesteps=options.timesteps(T)[::-1])
    net, x = fixed_net("linear"), x_T()
    diff = compare(run_ours(make(), net, options, x), run_diffusers(s, x, net, edm=True))
    print(f"{sampler} linear trailing{steps}: max |ours - diffusers| = {diff:.1e}")
    assert diff < TOL


# --- EDM's own sampler (for the churn, which diffusers' Heun lacks and its Euler applies after the call) --
def edm_reference(
    net, schedule: str, sigmas: np.ndarray, x: torch.Tensor, randn_like, s_churn: float, s_tmax: float, heun: bool
) -> torch.Tensor:
    """NVlabs/edm generate.py's edm_sampler (S_min = 0, S_noise = 1), transcribed, with the VP network as
    D(x; sigma) = x - sigma eps(x / sqrt(1 + sigma^2), t(sigma)) and t(sigma) from log sigma interpolated.
    (EDM draws the churn noise at every step, multiplied by 0 where gamma = 0; here, as ours, only where used.)"""
    abar = np.cumprod(1.0 - SCHEDULES[schedule])
    log_sigmas = 0.5 * np.log((1.0 - abar) / abar)

    def denoise(x_hat, sigma):
        t = torch.full((x_hat.shape[0],), float(np.interp(np.log(sigma), log_sigmas, np.arange(T))), dtype=x_hat.dtype)
        return x_hat - sigma * net(x_hat / math.sqrt(1.0 + sigma**2), t)

    t_steps = list(sigmas) + [0.0]
    num_steps = len(sigmas)
    x_next = x * math.sqrt(1.0 + t_steps[0] ** 2)  # our x_T is the VP state
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(s_churn / num_steps, math.sqrt(2) - 1) if 0 <= t_cur <= s_tmax else 0
        t_hat = t_cur + gamma * t_cur
        x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * randn_like(x_cur) if gamma > 0 else x_cur
        denoised = denoise(x_hat, t_hat)
        d_cur = (x_hat - denoised) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if heun and i < num_steps - 1:
            d_prime = (x_next - denoise(x_next, t_next)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("s_churn", [0.0, 10.0])
def test_euler_and_heun_with_churn_match_edms_sampler(sampler, s_churn):
    """With the same noise draws; our churn never raises sigma above the noisiest training level (there it is
    skipped), so the reference's S_max sits just below sigma_max."""
    options = SamplerOptions(sampler, steps=12, s_churn=s_churn, clip_denoised=False)
    levels = process_for(make(), options).levels
    sigmas = np.array([lv.noise for lv in levels][::-1])
    net, x = fixed_net("linear"), x_T()
    ours = run_ours(make(), net, options, x, seed=5)
    g = torch.Generator().manual_seed(5)
    theirs = edm_reference(
        net,
        "linear",
        sigmas,
        x,
        lambda y: torch.randn(y.shape, generator=g, dtype=y.dtype),
        s_churn,
        s_tmax=sigmas[0] * (1 - 1e-9),
        heun=sampler == "heun",
    )
    assert compare(ours, theirs) < 1e-9
    if s_churn:
        assert (ours - run_ours(make(), net, options.replace(s_churn=0.0), x)).abs().max() > 1e-3


# --- the placements ----------------------------------------------------------------------------------
@pytest.mark.filterwarnings(TORCH_ARRAY_WARNING)
def test_placements_are_diffusers_timesteps_and_sigmas():
    for steps in (5, 10, 25):
        for spacing in ("linspace", "trailing"):
            s = scheduler(DPMSolverMultistepScheduler, "linear", timestep_spacing=spacing)
            s.set_timesteps(steps)
            assert space_timesteps(T, f"{spacing}{steps}") == sorted(s.timesteps.tolist())
        for spacing, cls, config in [
            ("karras", EulerDiscreteScheduler, dict(use_karras_sigmas=True)),
            ("logsnr", DPMSolverMultistepScheduler, dict(use_lu_lambdas=True)),
        ]:
            s = scheduler(cls, "cosine", **config)
            s.set_timesteps(steps)
            times, lambdas = log_snr_grid(make("cosine").alphas_cumprod, f"{spacing}{steps}")
            np.testing.assert_allclose(np.exp(-lambdas)[::-1], s.sigmas[:-1].numpy(), rtol=1e-6)
            if cls is EulerDiscreteScheduler:  # its fractional timesteps are ours
                np.testing.assert_allclose(times[::-1], s.timesteps.numpy(), atol=1e-3)
    # both span the training range: lambda_{T-1} down to lambda_0
    table = log_snr(make().alphas_cumprod)
    for spacing in ("karras7", "logsnr7"):
        times, lambdas = log_snr_grid(make().alphas_cumprod, spacing)
        assert times[0] == pytest.approx(0, abs=1e-9) and times[-1] == pytest.approx(T - 1, abs=1e-9)
        np.testing.assert_allclose(lambdas[[0, -1]], table[[0, -1]], rtol=1e-12)


def test_each_sampler_takes_the_spacings_that_apply_to_it():
    for name in ("ddpm", "ddim"):
        for spacing in ("50", "ddim50", "quad20", "10,20", [0, 500, 999], "linspace20", "trailing20"):
            SamplerOptions(name, spacing=spacing)
        for spacing in ("karras20", "logsnr20"):
            with pytest.raises(ValueError, match=f"does not apply to sampler={name}; .*sampler=dpmpp_2m"):
                SamplerOptions(name, spacing=spacing)
    for name in SOLVERS:
        for spacing in (
            "50",
            "ddim50",
            "quad20",
            "10,20",
            [0, 500, 999],
            "linspace20",
            "trailing20",
            "karras20",
            "logsnr20",
        ):
            SamplerOptions(name, spacing=spacing)
    assert {name: entry.default_spacing for name, entry in SAMPLERS.items()} == {
        "ddpm": None,
        "ddim": None,
        "dpmpp_2m": "logsnr",
        "dpmpp_3m": "logsnr",
        "dpmpp_2m_sde": "logsnr",
        "unipc": "logsnr",
        "euler": "karras",
        "heun": "karras",
    }


@pytest.mark.parametrize(
    "values, message",
    [
        (dict(sampler="dpmpp_2m", spacing="karras"), r"takes its number of steps from steps; set steps"),
        (dict(sampler="dpmpp_2m", spacing="karrasx"), "unknown timestep spacing"),
        (dict(sampler="dpmpp_2m", spacing="foo"), "unknown timestep spacing"),
        (dict(sampler="dpmpp_2m", order=3), r"order=3 has no effect with sampler=dpmpp_2m .*sampler=unipc"),
        (dict(sampler="unipc", order=4), "sampler=unipc takes order 1 or 2 or 3"),
        (dict(sampler="unipc", order=2.0), "order must be an integer"),
        (dict(sampler="ddim", s_churn=1.0), r"s_churn=1.0 has no effect with sampler=ddim; .*sampler=euler, heun"),
        (dict(sampler="euler", s_churn=-1), "s_churn must be a number >= 0"),
        (dict(sampler="dpmpp_2m", eta=0.5), "eta=0.5 has no effect with sampler=dpmpp_2m"),
    ],
)
def test_bad_solver_options_fail_on_construction(values, message):
    with pytest.raises(ValueError, match=message):
        SamplerOptions(**values)


def test_nfe_and_what_the_options_record():
    assert SamplerOptions("ddpm").nfe(T) == T
    assert SamplerOptions("ddim", steps=50).nfe(T) == 50
    assert SamplerOptions("ddim", spacing="10,20").nfe(T) == 30
    assert SamplerOptions("dpmpp_2m", steps=10).nfe(T) == 10
    assert SamplerOptions("heun", steps=10).nfe(T) == 19  # 2 calls per step but the last
    assert SamplerOptions("heun", spacing="trailing5").nfe(T) == 9
    assert SamplerOptions("unipc", spacing="karras", steps=7).resolved_spacing() == "karras7"
    assert SamplerOptions("dpmpp_2m", steps=10).resolved_spacing() == "logsnr10"
    assert SamplerOptions("ddim", spacing="trailing", steps=10).timesteps(T) == list(range(99, T, 100))
    assert SamplerOptions("ddim", steps=10).resolved_spacing() is None  # ddim / ddpm: unchanged
    with pytest.raises(ValueError, match="between training timesteps"):
        SamplerOptions("euler", steps=10).timesteps(T)
    assert SamplerOptions("unipc").solver_order == 2 and SamplerOptions("unipc").as_dict()["order"] == 2
    assert SamplerOptions("unipc", order=3).replace(sampler="ddim", order=None).as_dict()["sampler"] == "ddim"
    assert SamplerOptions("unipc").replace(sampler="ddim").sampler == "ddim"  # no order was set
    assert SamplerOptions("euler", steps=10).as_dict()["spacing"] == "karras10"  # as placed
    assert set(SamplerOptions("ddim").as_dict()) == {"sampler", "steps", "spacing", "eta", "clip_denoised"}
    assert set(SamplerOptions("heun").as_dict()) == {"sampler", "steps", "spacing", "eta", "clip_denoised", "s_churn"}
    assert visited_timesteps(make(), SamplerOptions("ddim", steps=4)) == [0, 333, 666, 999]
    assert visited_timesteps(make(), SamplerOptions("heun", spacing="trailing4")) == [249, 499, 749, 999]
    karras = visited_timesteps(make(), SamplerOptions("euler", steps=4))
    assert len(karras) == 4 and karras[0] == pytest.approx(0, abs=1e-9) and karras[-1] == pytest.approx(T - 1)
    # check_options validates what a loaded checkpoint is run with
    assert check_options(SamplerOptions("euler", steps=10), T) is None
    assert check_options(SamplerOptions("euler", spacing="trailing4"), T) == [249, 499, 749, 999]
    with pytest.raises(ValueError, match="ends at"):
        check_options(SamplerOptions("dpmpp_2m", spacing="ddim7"), T, until=300)


def test_every_sampler_yaml_builds_its_options():
    from pathlib import Path

    from omegaconf import OmegaConf

    conf = Path(__file__).resolve().parents[1] / "conf" / "sampler"
    names = sorted(p.stem for p in conf.glob("*.yaml"))
    assert set(SAMPLERS) <= set(names)  # every sampler has its file; presets of one (ddim_eta1) add more
    for name in names:
        values = OmegaConf.to_container(OmegaConf.load(conf / f"{name}.yaml"))
        assert set(values) == {
            "sampler",
            "steps",
            "spacing",
            "eta",
            "clip_denoised",
            "order",
            "s_churn",
            "threshold",
            "threshold_percentile",
        }
        options = SamplerOptions.from_mapping(values)
        assert name == options.sampler or name.startswith(f"{options.sampler}_"), name
        assert options.nfe(T) >= 1


# --- the oracle --------------------------------------------------------------------------------------
def affine_map(schedule: str, options: SamplerOptions, delta: float = 1e-3) -> tuple[float, float]:
    """(shift, slope) of a deterministic run with the oracle: x_T -> slope x_T + shift, pixel by pixel."""
    z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    run = lambda x: sample(make(schedule), Oracle(schedule), z.shape, options, noise=x).item()  # noqa: E731
    shift = run(z)
    return shift, (run(z + delta) - shift) / delta


# The exact std of each default run with the oracle (target s = 0.2; mean 0.1 within 2e-4 everywhere),
# measured with this file's oracle. Uniform-in-t placements end far from the data (lowest level t ~ T / N)
# and lose the spread: DDIM 10 gives 0.098 (linear) / 0.139 (cosine). Order 3 and Heun overshoot on this
# stiff data (s = 0.2) until ~20 / ~50 NFE; Euler is first order.
ORACLE_STD = {  # (sampler, order): {(schedule, NFE): std}
    ("dpmpp_2m", None): {
        ("linear", 10): 0.2038,
        ("cosine", 10): 0.1954,
        ("linear", 20): 0.2025,
        ("cosine", 20): 0.2052,
        ("linear", 50): 0.2002,
        ("cosine", 50): 0.2010,
    },
    ("unipc", 2): {
        ("linear", 10): 0.2096,
        ("cosine", 10): 0.2040,
        ("linear", 20): 0.2017,
        ("cosine", 20): 0.2059,
        ("linear", 50): 0.1999,
        ("cosine", 50): 0.2004,
    },
    ("dpmpp_3m", None): {
        ("linear", 10): 0.2312,
        ("cosine", 10): 0.2507,
        ("linear", 20): 0.2016,
        ("cosine", 20): 0.2067,
        ("linear", 50): 0.1999,
        ("cosine", 50): 0.2004,
    },
    ("unipc", 3): {
        ("linear", 10): 0.2318,
        ("cosine", 10): 0.2635,
        ("linear", 20): 0.1999,
        ("cosine", 20): 0.2028,
        ("linear", 50): 0.1998,
        ("cosine", 50): 0.1999,
    },
    ("euler", None): {("linear", 10): 0.1359, ("cosine", 10): 0.0813, ("linear", 50): 0.1863, ("cosine", 50): 0.1696},
    ("heun", None): {("linear", 19): 0.2645, ("cosine", 19): 0.5217, ("linear", 49): 0.2077, ("cosine", 49): 0.2505},
}


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "unipc"])
def test_oracle_reaches_the_data_at_10_nfe(schedule, sampler):
    """The default DPM-Solver++(2M) and UniPC (order 2, uniform logSNR) turn N(0, 1) into N(0.1, 0.2^2) within
    2% / 5% of s at 10 network calls; DDIM's 10 steps keep half the spread."""
    options = SamplerOptions(sampler, steps=10, clip_denoised=False)
    assert options.nfe(T) == 10
    mean, std = affine_map(schedule, options)
    print(f"{sampler} {schedule} 10 NFE oracle: mean {mean:.4f} std {std:.4f}")
    assert mean == pytest.approx(M, abs=2e-4)
    assert std == pytest.approx(S, abs=0.005 if sampler == "dpmpp_2m" else 0.01)
    ddim_mean, ddim_std = affine_map(schedule, SamplerOptions("ddim", steps=10, clip_denoised=False))
    assert abs(ddim_std - S) > 5 * abs(std - S)


@pytest.mark.parametrize("sampler, order", list(ORACLE_STD))
def test_oracle_moments_per_nfe(sampler, order):
    """The measured table, and convergence: every solver is within 0.06 of s by ~50 NFE and closer than at 10."""
    for (schedule, nfe), expected in ORACLE_STD[(sampler, order)].items():
        steps = (nfe + 1) // 2 if sampler == "heun" else nfe
        options = SamplerOptions(sampler, steps=steps, order=order, clip_denoised=False)
        assert options.nfe(T) == nfe
        mean, std = affine_map(schedule, options)
        assert mean == pytest.approx(M, abs=3e-4)
        assert std == pytest.approx(expected, abs=2e-4), (schedule, nfe)
    for schedule in ("linear", "cosine"):
        by_nfe = {nfe: std for (s, nfe), std in ORACLE_STD[(sampler, order)].items() if s == schedule}
        first, last = min(by_nfe), max(by_nfe)
        assert abs(by_nfe[last] - S) < min(abs(by_nfe[first] - S), 0.06)


def sde_moments(schedule: str, options: SamplerOptions) -> tuple[float, float]:
    """Exact mean and std of a stochastic run with the oracle: out = A x_T + B + sum_k c_k z_k, with A, B from
    a noiseless run and each c_k from a run whose only noise is a unit draw at the k-th call."""
    z = torch.zeros(1, 1, 1, 1, dtype=torch.float64)

    def run(x, impulse: int | None) -> float:
        calls = iter(range(10**6))
        unit = lambda y: torch.full_like(y, 1.0 if next(calls) == impulse else 0.0)  # noqa: E731
        return denoise_from(make(schedule), Oracle(schedule), x, T - 1, options, randn_like=unit).item()

    shift = run(z, None)
    slope = (run(z + 1e-3, None) - shift) / 1e-3
    coefficients = []
    for k in range(options.nfe(T)):
        coefficients.append(run(z, k) - shift)
    return shift, math.sqrt(slope**2 + sum(c**2 for c in coefficients))


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
@pytest.mark.parametrize(
    "options, expected",
    [
        (SamplerOptions("dpmpp_2m_sde", steps=10, clip_denoised=False), {"linear": 0.1987, "cosine": 0.1819}),
        (SamplerOptions("dpmpp_2m_sde", steps=20, clip_denoised=False), {"linear": 0.2058, "cosine": 0.2080}),
        (SamplerOptions("heun", steps=25, s_churn=40.0, clip_denoised=False), {"linear": 0.2188, "cosine": 0.2846}),
    ],
)
def test_oracle_stochastic_samplers(schedule, options, expected):
    """The exact moments of the SDE solver and of Heun with churn, and 65536 sampled pixels around them
    (standard error of the std ~ s / sqrt(2 * 65536) ~ 0.0006)."""
    mean, std = sde_moments(schedule, options)
    assert mean == pytest.approx(M, abs=3e-4)
    assert std == pytest.approx(expected[schedule], abs=3e-4)
    x = sample(
        make(schedule), Oracle(schedule), (256, 1, 16, 16), options, generator=torch.Generator().manual_seed(0)
    ).double()
    assert x.mean().item() == pytest.approx(mean, abs=0.003)
    assert x.std().item() == pytest.approx(std, abs=0.003)


# --- parameterisations, guidance, entry points -------------------------------------------------------
def oracle_as(diffusion: GaussianDiffusion, schedule: str, mean_type: str):
    """The oracle re-expressed as an x0 or mu network (mu with the training posterior coefficients, interpolated
    in t as the solvers read them)."""
    oracle = Oracle(schedule)
    c1_table = diffusion.posterior_mean_coef1.numpy()
    c2_table = diffusion.posterior_mean_coef2.numpy()

    def net(x, t):
        a = abar_at(schedule, t).to(x.dtype)
        x0 = (x - (1 - a).sqrt() * oracle(x, t)) / a.sqrt()
        if mean_type == "x0":
            return x0
        tt = t.double().numpy()
        c1 = torch.from_numpy(np.interp(tt, np.arange(T), c1_table)).view(-1, 1, 1, 1).to(x.dtype)
        c2 = torch.from_numpy(np.interp(tt, np.arange(T), c2_table)).view(-1, 1, 1, 1).to(x.dtype)
        return c1 * x0 + c2 * x

    return net


@pytest.mark.parametrize("sampler", SOLVERS)
@pytest.mark.parametrize("spacing", ["trailing8", "karras8"])
def test_every_parameterisation_and_variance_gives_the_same_run(sampler, spacing):
    x = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    options = SamplerOptions(sampler, spacing=spacing, clip_denoised=False)
    draw = lambda diffusion, net: sample(
        diffusion,
        net,
        x.shape,
        options,
        noise=x,  # noqa: E731
        generator=torch.Generator().manual_seed(1),
    )
    reference = draw(make(), Oracle())
    np.testing.assert_allclose(draw(make(var_type="learned_range"), Oracle(channels_out=2)), reference, atol=1e-12)
    for mean_type in ("x0", "mu"):
        diffusion = make(mean_type=mean_type, var_type="fixed_small")
        np.testing.assert_allclose(draw(diffusion, oracle_as(diffusion, "linear", mean_type)), reference, atol=1e-9)


class TwoClassNet:
    """A class-conditional stand-in (num_classes=2, label 2 = null) whose eps depends on the label."""

    num_classes = 2

    def __call__(self, x, t, y=None):
        shift = torch.zeros(x.shape[0], dtype=x.dtype) if y is None else (y.to(x.dtype) - 0.5) * (y != 2)
        return fixed_net("linear", channels_out=1)(x, t) + 0.3 * shift.view(-1, 1, 1, 1)


@pytest.mark.parametrize("sampler", SOLVERS)
def test_classifier_free_guidance_combines_the_two_passes(sampler):
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    net, w = TwoClassNet(), 2.0
    options = SamplerOptions(sampler, steps=6)
    guided = sample(
        make(), net, x.shape, options, Guidance(y=y, scale=w), noise=x, generator=torch.Generator().manual_seed(1)
    )
    combined = lambda xt, t: (1 + w) * net(xt, t, y=y) - w * net(xt, t, y=torch.full_like(y, 2))  # noqa: E731
    by_hand = sample(make(), combined, x.shape, options, noise=x, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(guided, by_hand, atol=1e-12)
    assert (
        guided
        - sample(
            make(), lambda xt, t: net(xt, t, y=y), x.shape, options, noise=x, generator=torch.Generator().manual_seed(1)
        )
    ).abs().max() > 1e-3


@pytest.mark.parametrize("sampler", SOLVERS)
def test_classifier_guidance_shifts_eps_by_sigma_times_the_gradient(sampler):
    """Dhariwal & Nichol Alg. 2: eps - sqrt(1 - abar_t) s grad log p(y | x_t); at training timesteps the same run
    comes from a network that already made the shift. The classifier sees the original timesteps."""
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    y = torch.tensor([0, 1, 0, 1])
    seen = []

    def classifier(xt, t):  # logits linear in x: grad log softmax is (e_y - p) . W
        seen.append(t[0].item())
        return torch.stack([xt.flatten(1).sum(1), -xt.flatten(1).sum(1)], dim=1) * (1 + t.to(xt.dtype).view(-1, 1) / T)

    net, scale = fixed_net("linear", channels_out=1), 3.0
    options = SamplerOptions(sampler, spacing="trailing6", clip_denoised=False)
    guided = sample(
        make(),
        net,
        x.shape,
        options,
        Guidance(y=y, classifier=classifier, classifier_scale=scale),
        noise=x,
        generator=torch.Generator().manual_seed(1),
    )
    assert set(seen) <= set(options.timesteps(T))

    def shifted(xt, t):
        with torch.enable_grad():
            v = xt.detach().requires_grad_(True)
            log_p = torch.log_softmax(classifier(v, t), dim=1)[torch.arange(len(y)), y].sum()
            (grad,) = torch.autograd.grad(log_p, v)
        a = make().alphas_cumprod[t].view(-1, 1, 1, 1)
        return net(xt, t) - (1 - a).sqrt() * scale * grad

    by_hand = sample(make(), shifted, x.shape, options, noise=x, generator=torch.Generator().manual_seed(1))
    np.testing.assert_allclose(guided, by_hand, atol=1e-10)


def test_trajectory_and_denoise_from_run_the_solvers():
    net = fixed_net("linear", channels_out=1)
    options = SamplerOptions("dpmpp_2m", spacing="karras", steps=8)
    plain = sample(make(), net, (2, 1, 4, 4), options, generator=torch.Generator().manual_seed(0))
    traj = sample_trajectory(
        make(), net, (2, 1, 4, 4), options, record_every=3, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(traj.sample, plain) and traj.xt.shape[1] == 4  # steps 1, 4, 7 and 8
    assert traj.timesteps[0] == pytest.approx(T - 1) and traj.timesteps[-1] == pytest.approx(0, abs=1e-9)
    assert all(isinstance(t, float) for t in traj.timesteps[1:-1])  # Karras levels fall between training steps
    # from an intermediate x_t the levels end at t
    oracle = Oracle()
    x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    denoise_from(make(), oracle, x, 300, SamplerOptions("heun", spacing="trailing3"))
    assert oracle.calls == [300, 200, 200, 99, 99]  # trailing over 0..300 starts at t; Heun: 2 calls but the last
    oracle.calls.clear()
    denoise_from(make(), oracle, x, 300, SamplerOptions("unipc", steps=4))
    assert oracle.calls[0] == pytest.approx(300) and oracle.calls[-1] == pytest.approx(0, abs=1e-9)
    assert len(oracle.calls) == 4


def test_solver_schedule_levels():
    schedule = SolverSchedule(make(), [0, 10, 500, 999])
    table = log_snr(make().alphas_cumprod)
    for k, t in enumerate([0, 10, 500, 999]):
        level = schedule.level(k)
        abar = float(make().alphas_cumprod[t])
        assert level.alpha == pytest.approx(math.sqrt(abar), rel=1e-12)
        assert level.sigma == pytest.approx(math.sqrt(1 - abar), rel=1e-9)
        assert level.log_snr == pytest.approx(table[t], rel=1e-12)
    assert schedule.level(-1).sigma == 0 and schedule.level(-1).log_snr == math.inf
    assert schedule.timestep_map == [0, 10, 500, 999]
    with pytest.raises(ValueError, match="ascending"):
        SolverSchedule(make(), [10, 5])


@pytest.mark.parametrize("sampler", SOLVERS)
def test_solvers_sample_on_another_device_and_in_float32(sampler):
    out = sample(
        make(), lambda x, t: torch.zeros_like(x), (1, 1, 4, 4), SamplerOptions(sampler, steps=3), device="meta"
    )
    assert out.device.type == "meta"
    x = sample(
        make(),
        fixed_net("linear", channels_out=1),
        (2, 1, 4, 4),
        SamplerOptions(sampler, steps=5),
        generator=torch.Generator().manual_seed(0),
    )
    assert x.dtype == torch.float32 and torch.isfinite(x).all()


# --- benchmarks/sampler_quality.py ---------------------------------------------------------------------
@pytest.mark.slow
def test_sampler_quality_script_runs_on_a_tiny_checkpoint(compose_train, tmp_path):
    from test_samplers import write_checkpoint

    from benchmarks.sampler_quality import configurations, main

    grid = configurations(["dpmpp_2m", "heun", "ddpm", "ddim"], [5, 10], [10])
    assert [(o.sampler, o.nfe(T)) for o in grid] == [
        ("dpmpp_2m", 5),
        ("dpmpp_2m", 10),
        ("heun", 5),
        ("heun", 9),
        ("ddpm", T),
        ("ddim", 10),
    ]
    ckpt = write_checkpoint(compose_train, tmp_path / "last.ckpt")
    result = main(
        [
            str(ckpt),
            "--out",
            str(tmp_path / "out"),
            "--num-samples",
            "4",
            "--batch-size",
            "4",
            "--samplers",
            "dpmpp_2m",
            "heun",
            "ddim",
            "--nfe",
            "2",
            "3",
            "--ddim-steps",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert [(row["sampler"], row["nfe"]) for row in result["rows"]] == [
        ("dpmpp_2m", 2),
        ("dpmpp_2m", 3),
        ("heun", 1),
        ("heun", 3),
        ("ddim", 2),
    ]
    assert all(math.isfinite(row["fd"]) and row["seconds_per_image"] > 0 for row in result["rows"])
    written = json.loads((tmp_path / "out" / "sampler_quality.json").read_text())
    assert written["rows"] == result["rows"] and written["num_timesteps"] == 50
    assert (tmp_path / "out" / "sampler_quality.png").stat().st_size > 0


@pytest.mark.slow
def test_sample_and_evaluate_commands_run_the_solvers_and_record_nfe(
    compose_train, compose_sample, compose_evaluate, tmp_path
):
    from test_samplers import write_checkpoint

    import sample as sample_command
    from src.evaluation import run as evaluate

    ckpt = write_checkpoint(compose_train, tmp_path / "last.ckpt")  # T=50
    common = [f"ckpt_path={ckpt}", "device=cpu"]
    for sampler, mode in [("dpmpp_2m", "grid"), ("heun", "trajectory"), ("unipc", "invert")]:
        written = sample_command.run(
            compose_sample(
                *common, f"sampler={sampler}", "steps=3", f"mode={mode}", "num_samples=2", output_dir=tmp_path / sampler
            )
        )
        assert all(path.is_file() for path in written.values())
    metrics = evaluate(
        compose_evaluate(*common, "sampler=heun", "steps=3", "num_samples=2", "fid=false", output_dir=tmp_path / "eval")
    )
    assert metrics["samples"]["nfe"] == 5 and len(metrics["samples"]["timesteps"]) == 3  # Heun: 2 calls but the last
    with pytest.raises(ConfigError, match="karras"):  # a placement ddim cannot take, before the model is built
        sample_command.run(compose_sample(*common, "sampler=ddim", "spacing=karras5", output_dir=tmp_path / "bad"))
