"""Generating images with a trained network: one entry point for every sampler, the reverse process
from an intermediate x_t, and the recorded trajectory of a run (DDPM Fig. 6).

A sampler steps through its process: the (respaced) GaussianDiffusion for ddpm / ddim, or for the ODE / SDE
solvers a SolverSchedule, the noise levels of the options' spacing on the diffusion's continuous-time view."""

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .gaussian_diffusion import GaussianDiffusion, Model
from .guidance import NO_GUIDANCE, Guidance, guide
from .respace import SpacedDiffusion, log_snr_grid, space_timesteps, spacing_count
from .samplers import SAMPLERS, RandnLike, ReverseRun, SamplerOptions
from .solvers import SolverSchedule, check_finite_log_snr

DEFAULT_OPTIONS = SamplerOptions()


def respaced(
    diffusion: GaussianDiffusion, steps: int | None = None, spacing: str | list[int] | None = None
) -> GaussianDiffusion:
    """The diffusion to sample with: itself for all T steps, else a SpacedDiffusion over `spacing`
    (default: `steps` evenly strided timesteps, first and last included)."""
    num_t = diffusion.num_timesteps
    if spacing is None and (steps is None or steps == num_t):
        return diffusion
    return SpacedDiffusion(diffusion, space_timesteps(num_t, spacing if spacing is not None else steps))


def respaced_for(diffusion: GaussianDiffusion, options: SamplerOptions) -> GaussianDiffusion:
    """`respaced` over the options' steps / spacing (the spacing as given: a solver's own default placement
    does not apply, so DDIM inversion with a solver's options strides its steps evenly, as ddim_sample does)."""
    return respaced(diffusion, options.steps, options.explicit_spacing())


def process_for(
    diffusion: GaussianDiffusion, options: SamplerOptions, until: int | None = None
) -> GaussianDiffusion | SolverSchedule:
    """What the options' sampler steps through on a run from timestep `until` (default T - 1, from noise):
    the diffusion, or a SpacedDiffusion over the kept timesteps (ddpm, ddim); a SolverSchedule over the
    spacing's noise levels for the solvers (every training step 0..until when neither steps nor spacing is
    set)."""
    num_t = diffusion.num_timesteps
    if not SAMPLERS[options.sampler].continuous:
        if until is None:
            return respaced_for(diffusion, options)
        kept = check_options(options, num_t, until)
        return diffusion if kept is None else SpacedDiffusion(diffusion, kept)
    until = num_t - 1 if until is None else until
    check_finite_log_snr(diffusion, tuple(name for name, entry in SAMPLERS.items() if not entry.continuous))
    if options.is_continuous():
        check_options(options, num_t, until)
        times, lambdas = log_snr_grid(diffusion.alphas_cumprod, options.resolved_spacing(), until)
        return SolverSchedule(diffusion, times, lambdas)
    kept = check_options(options, num_t, until)
    return SolverSchedule(diffusion, list(range(until + 1)) if kept is None else kept)


@dataclass
class Trajectory:
    """The recorded states of one reverse run (rows = samples, columns = recorded steps).

    sample: [N x C x H x W] the final images in [-1, 1], exactly what `sample` returns.
    timesteps: [S] the original timestep t (what the network received) of each recorded step.
    xt: [N x S x C x H x W] the state after each recorded step: x at the next kept timestep
        (x_{t-1} without respacing); after the last step it is `sample`.
    pred_x0: [N x S x C x H x W] the x_0 predicted at each recorded step (clipped when clip_denoised).
    """

    sample: torch.Tensor
    timesteps: list[int]
    xt: torch.Tensor
    pred_x0: torch.Tensor


def on_device(diffusion: GaussianDiffusion, device: torch.device) -> GaussianDiffusion:
    """The diffusion with its buffers on `device`; a copy when it lives elsewhere, so sampling never
    moves the caller's module. A SolverSchedule holds Python numbers and lives on no device."""
    if isinstance(diffusion, SolverSchedule) or diffusion.betas.device == device:
        return diffusion
    return copy.deepcopy(diffusion).to(device)


def generator_randn_like(generator: torch.Generator | None) -> RandnLike:
    return lambda x: torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _reverse(
    diff: GaussianDiffusion,
    model: Model,
    x: torch.Tensor,
    options: SamplerOptions,
    guidance: Guidance,
    *,
    randn_like: RandnLike | None = None,
    generator: torch.Generator | None = None,
    model_kwargs: dict | None,
    progress: bool,
    on_step: Callable[[int, dict], None] | None = None,
) -> torch.Tensor:
    """Run the reverse process of `diff` from x at its last index down to index 0 with the options'
    sampler; returns the state after the last step (unclamped). The steps draw their noise with randn_like
    (default: from `generator`); on_step(index, step_output) sees every step when given."""
    model, model_kwargs, cond_fn = guide(
        model, guidance.y, guidance.scale, guidance.classifier, guidance.classifier_scale, model_kwargs
    )
    step = SAMPLERS[options.sampler].step
    run = ReverseRun(options, randn_like or generator_randn_like(generator), model_kwargs, cond_fn)
    indices = range(diff.num_timesteps - 1, -1, -1)
    if progress:
        from tqdm.auto import tqdm

        indices = tqdm(indices, desc=f"{options.sampler} sampling", leave=False)
    for i in indices:
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        run.state["index"] = i  # t as a Python int: solvers branch on it without a device sync
        out = step(diff, model, x, t, run)
        x = out["sample"]
        if on_step is not None:
            on_step(i, out)
    return x


def _start(diffusion, shape, options, generator, device, noise):
    device = torch.device(device) if device is not None else diffusion.betas.device
    diff = on_device(process_for(diffusion, options), device)
    x = noise.to(device) if noise is not None else torch.randn(shape, generator=generator, device=device)
    return diff, x


@torch.no_grad()
def sample(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    options: SamplerOptions = DEFAULT_OPTIONS,
    guidance: Guidance = NO_GUIDANCE,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Draw images [N x C x H x W] in [-1, 1] with `options` (sampler, steps / spacing over the T training
    steps, eta, clipping) and `guidance` (labels, classifier-free and classifier guidance).

    All randomness comes from `generator` (and `noise` = x_T if given), so a seed fixes the samples.
    """
    diff, x = _start(diffusion, shape, options, generator, device, noise)
    x = _reverse(diff, model, x, options, guidance, generator=generator, model_kwargs=model_kwargs, progress=progress)
    return x.clamp(-1.0, 1.0)


def ddpm_sample(diffusion: GaussianDiffusion, model: Model, shape: tuple[int, ...], **kwargs) -> torch.Tensor:
    """Ancestral sampling over all T steps (DDPM Algorithm 2); kwargs as in `sample`."""
    return sample(diffusion, model, shape, SamplerOptions("ddpm"), **kwargs)


def _recorded_indices(
    num_steps: int, timestep_of: list[int], record_every: int | None, record_timesteps: Sequence[int] | None
) -> set[int]:
    """The indices (into the kept steps) whose state a trajectory keeps; the last step (index 0) always."""
    if record_every is not None and record_timesteps is not None:
        raise ValueError("give record_every or record_timesteps, not both")
    if record_timesteps is not None:
        where = {t: i for i, t in enumerate(timestep_of)}
        missing = [t for t in record_timesteps if t not in where]
        if missing:
            raise ValueError(
                f"record_timesteps {missing} are not among the sampled timesteps "
                f"({num_steps} steps from {timestep_of[0]} to {timestep_of[-1]})"
            )
        return {where[t] for t in record_timesteps} | {0}
    # steps counted n = 1..K in the order they run; the n-th runs at index K - n
    if record_every is None:
        count = min(10, num_steps)
        numbers = {1 + round(j * (num_steps - 1) / max(count - 1, 1)) for j in range(count)}
    elif record_every >= 1:
        numbers = set(range(1, num_steps + 1, record_every))
    else:
        raise ValueError(f"record_every must be >= 1, got {record_every}")
    return {num_steps - n for n in numbers} | {0}


@torch.no_grad()
def sample_trajectory(
    diffusion: GaussianDiffusion,
    model: Model,
    shape: tuple[int, ...],
    options: SamplerOptions = DEFAULT_OPTIONS,
    guidance: Guidance = NO_GUIDANCE,
    *,
    record_every: int | None = None,
    record_timesteps: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    noise: torch.Tensor | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> Trajectory:
    """`sample`, keeping x_t and the predicted x_0 at chosen steps (progressive generation, DDPM Fig. 6).

    record_every: record the first step and every k-th after it (steps counted 1..K in the order they
        run, so steps 1, 1 + k, 1 + 2k, ...);
    record_timesteps: record the steps at these original timesteps (each must be a sampled step).
    Give at most one; the default records 10 steps evenly spaced from the first to the last. The last
    step is always recorded, so `trajectory.xt[:, -1]` is `trajectory.sample`. Same seed, same images
    as `sample`. Other arguments as in `sample`.
    """
    diff, x = _start(diffusion, shape, options, generator, device, noise)
    num_steps = diff.num_timesteps
    timestep_of = _timesteps_of(diff)
    record = _recorded_indices(num_steps, timestep_of, record_every, record_timesteps)
    states, preds, timesteps = [], [], []

    def on_step(i: int, out: dict) -> None:
        if i in record:
            states.append(out["sample"].clamp(-1.0, 1.0) if i == 0 else out["sample"])
            preds.append(out["pred_x0"])
            timesteps.append(timestep_of[i])

    x = _reverse(
        diff,
        model,
        x,
        options,
        guidance,
        generator=generator,
        model_kwargs=model_kwargs,
        progress=progress,
        on_step=on_step,
    )
    return Trajectory(
        sample=x.clamp(-1.0, 1.0), timesteps=timesteps, xt=torch.stack(states, dim=1), pred_x0=torch.stack(preds, dim=1)
    )


def visited_timesteps(diffusion: GaussianDiffusion, options: SamplerOptions, until: int | None = None) -> list:
    """The original timesteps of the steps a run from `until` (default T - 1, from noise) takes, ascending:
    the network is called at each (Heun twice at all but the lowest); floats where a solver's level falls
    between training steps."""
    return _timesteps_of(process_for(diffusion, options, until))


def _timesteps_of(diff: GaussianDiffusion | SolverSchedule) -> list:
    """The original timestep of each index (floats where a solver's level falls between training steps)."""
    if isinstance(diff, SolverSchedule):
        return diff.timestep_map
    return diff.timestep_map.tolist() if isinstance(diff, SpacedDiffusion) else list(range(diff.num_timesteps))


def kept_timesteps_until(
    num_timesteps: int, t: int, steps: int | None = None, spacing: str | list[int] | None = None
) -> list[int] | None:
    """The timesteps a reverse run from timestep t visits: all of 0..t (None: no respacing needed when
    t = T - 1), or `space_timesteps(t + 1, spacing or steps)`, which must end at t when t < T - 1 (from
    T - 1 the start is noise, so a spacing may begin lower, as DDIM's does)."""
    if not 0 <= t < num_timesteps:
        raise ValueError(f"t must be in [0, {num_timesteps}), got {t}")
    if spacing is None and steps is None:
        return None if t == num_timesteps - 1 else list(range(t + 1))
    try:
        kept = space_timesteps(t + 1, spacing if spacing is not None else steps)
    except ValueError as err:
        if t == num_timesteps - 1:
            raise
        raise ValueError(f"{err} (a run from t={t} has the {t + 1} timesteps 0..{t})") from None
    if kept[-1] != t and t != num_timesteps - 1:  # from T - 1, x_t is noise: any spacing (e.g. DDIM's) is fine
        raise ValueError(
            f"spacing {spacing if spacing is not None else steps!r} over timesteps 0..{t} ends at "
            f"{kept[-1]}, not at t={t}; use an even spacing (an int number of steps)"
        )
    return kept


def check_options(options: SamplerOptions, num_timesteps: int, until: int | None = None) -> list[int] | None:
    """The timesteps a run from timestep `until` (default T - 1, i.e. from noise) visits with `options`;
    a spacing or step count that does not fit is a ValueError naming it. None: every step 0..until, or a
    solver's placement between training timesteps (logsnr, karras: see respace.log_snr_grid), whose count
    is checked here."""
    until = num_timesteps - 1 if until is None else until
    if options.is_continuous():
        if not 0 <= until < num_timesteps:
            raise ValueError(f"t must be in [0, {num_timesteps}), got {until}")
        spacing_count(options.resolved_spacing())
        return None
    return kept_timesteps_until(num_timesteps, until, options.steps, options.resolved_spacing())


@torch.no_grad()
def denoise_from(
    diffusion: GaussianDiffusion,
    model: Model,
    xt: torch.Tensor,
    t: int,
    options: SamplerOptions = DEFAULT_OPTIONS,
    guidance: Guidance = NO_GUIDANCE,
    *,
    generator: torch.Generator | None = None,
    randn_like: RandnLike | None = None,
    model_kwargs: dict | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Run the reverse process from xt [N x C x H x W] at the original timestep t (0-based) down to
    images in [-1, 1] (DDPM Sec. 4.4's decoding of an encoded x_t).

    The options' steps / spacing pick the visited timesteps among 0..t (t itself always first); without
    them every step is taken. `randn_like(x)` replaces the generator's step noise when given (e.g. noise
    shared across a batch). With t = T - 1 this is `sample` from noise=xt.
    """
    diff = on_device(process_for(diffusion, options, until=t), xt.device)
    x = _reverse(
        diff,
        model,
        xt,
        options,
        guidance,
        randn_like=randn_like,
        generator=generator,
        model_kwargs=model_kwargs,
        progress=progress,
    )
    return x.clamp(-1.0, 1.0)
