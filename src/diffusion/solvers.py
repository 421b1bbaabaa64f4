"""Fast samplers on a trained discrete-time model through its continuous-time view: DPM-Solver++ (2M, 3M and
the SDE 2M), UniPC (bh2) and EDM's Euler / Heun, each one step function for the SAMPLERS registry.

The view (DPM-Solver Sec. 2; EDM Table 1, VP column): x_t = alpha_t x_0 + sigma_t eps with
lambda_t = log(alpha_t / sigma_t) interpolated linearly in t between the T training steps (exact at integer
t), alpha_t = sqrt(sigmoid(2 lambda_t)), sigma_t = sqrt(sigmoid(-2 lambda_t)); EDM's noise level is
sigma_t / alpha_t = exp(-lambda_t). A run visits N levels t_{N-1} > ... > t_0 where it calls the network,
and ends at the clean image (lambda = +inf, sigma = 0), as diffusers' schedulers with final_sigmas_type
"zero". The network is called with the level's timestep: an integer (long) at training steps, a float
between them (Karras sigmas, uniform logSNR).

Every parameterisation gives the data prediction x_theta (eps: (x - sigma eps) / alpha; x0: itself; v:
alpha x - sigma v; mu:
inverting the training posterior mean with its coefficients interpolated in t); a learned variance is
ignored (the ODE and the SDE fix their own noise). Classifier guidance shifts eps by -sigma_t grad log p(y|x_t)
(Dhariwal & Nichol 2021, Alg. 2); the options' threshold bounds x_theta after guidance (clip: DPM-Solver++'s
thresholding at ratio 1; dynamic: Imagen's).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .gaussian_diffusion import GaussianDiffusion, Model, Threshold
from .guidance import CondFn
from .respace import log_snr, time_of_log_snr

if TYPE_CHECKING:  # the registry in samplers.py imports the step functions of this module
    from .samplers import ReverseRun


@dataclass(frozen=True)
class Level:
    """One point of the continuous-time view: timestep t (None at the clean end), lambda_t, alpha_t, sigma_t."""

    time: float | None
    log_snr: float
    alpha: float
    sigma: float

    @property
    def noise(self) -> float:
        """EDM's sigma = sigma_t / alpha_t (0 at the clean end)."""
        return self.sigma / self.alpha


CLEAN = Level(time=None, log_snr=math.inf, alpha=1.0, sigma=0.0)


def check_finite_log_snr(base: GaussianDiffusion, alternatives: tuple[str, ...] = ()) -> None:
    """The solvers start from a finite lambda_T: a zero-terminal-SNR schedule (alpha_bar_T = 0) is a one-line error
    that names the `alternatives` (the samplers that can run it, from the registry, which imports this module)."""
    if float(base.alphas_cumprod[-1]) == 0:
        fix = f"; use {' or '.join(f'sampler={name}' for name in alternatives)}" if alternatives else ""
        raise ValueError(
            f"the ODE / SDE solvers need a finite log-SNR at t = T, but alpha_bar_T = 0 (zero terminal SNR){fix}"
        )


def _level(time: float, lam: float) -> Level:
    # alpha^2 = sigmoid(2 lambda), sigma^2 = sigmoid(-2 lambda), computed without overflow for |lambda| large
    return Level(
        time=float(time),
        log_snr=float(lam),
        alpha=math.sqrt(1.0 / (1.0 + math.exp(-2.0 * lam))),
        sigma=math.sqrt(1.0 / (1.0 + math.exp(2.0 * lam))),
    )


class SolverSchedule:
    """The N levels a solver visits on the continuous-time view of `base` (the trained GaussianDiffusion).

    Index k = 0..N-1 is the level at times[k] (ascending, as a SpacedDiffusion's kept steps), index -1 the
    clean end; the sampling loop runs k = N-1 down to 0 and the step at k moves x from level k to k - 1.
    Values are float64 Python numbers, so they live on no device.

    Args:
        base: the diffusion the network was trained with (T steps).
        times: [N] ascending timesteps in [0, T - 1] (integers or not).
        log_snrs: [N] their lambda_t (default: interpolated from the training steps; the Karras and logSNR
            placements pass their exact values).
    """

    def __init__(self, base: GaussianDiffusion, times, log_snrs=None):
        check_finite_log_snr(base)
        self.base = base
        self.table = log_snr(base.alphas_cumprod)
        steps = np.arange(self.table.size, dtype=np.float64)
        self.times = np.asarray(times, dtype=np.float64)
        if self.times.ndim != 1 or self.times.size < 1 or np.any(np.diff(self.times) <= 0):
            raise ValueError(f"times must be a non-empty ascending 1-D sequence, got {self.times.tolist()}")
        if self.times[0] < 0 or self.times[-1] > steps[-1]:
            raise ValueError(f"times must lie in [0, {self.table.size - 1}], got {self.times[0]}..{self.times[-1]}")
        lambdas = np.interp(self.times, steps, self.table) if log_snrs is None else np.asarray(log_snrs, np.float64)
        self.levels = [_level(t, lam) for t, lam in zip(self.times, lambdas)]
        self.num_timesteps = len(self.levels)
        # mu-prediction: the training posterior's mean coefficients, interpolated in t
        self._coef1 = base.posterior_mean_coef1.detach().cpu().double().numpy()
        self._coef2 = base.posterior_mean_coef2.detach().cpu().double().numpy()
        self._steps = steps

    @property
    def timestep_map(self) -> list[float | int]:
        """The timestep of each index (ints where they are training steps): what a trajectory records."""
        return [int(t) if t == round(t) else float(t) for t in self.times]

    def level(self, k: int) -> Level:
        return CLEAN if k < 0 else self.levels[k]

    def level_at_noise(self, noise: float) -> Level:
        """The level of EDM noise sigma_t / alpha_t = `noise`, capped at the noisiest training step."""
        lam = max(-math.log(noise), float(self.table[-1]))
        return _level(float(time_of_log_snr(lam, self.table)), lam)

    def denoise(
        self,
        model: Model,
        x: torch.Tensor,
        level: Level,
        *,
        clip_denoised: bool | Threshold,
        model_kwargs: dict | None,
        cond_fn: CondFn | None,
    ) -> dict:
        """The network's prediction at x [N x C x H x W] on `level`: dict(pred_x0, pred_eps, t), with t [N]
        the timestep the network (and the classifier) received."""
        integral = level.time == round(level.time)
        dtype = torch.long if integral else torch.promote_types(x.dtype, torch.float32)
        t = torch.full((x.shape[0],), round(level.time) if integral else level.time, dtype=dtype, device=x.device)
        # 1. the mean part of the network output (a learned variance is not used)
        output = model(x, t, **(model_kwargs or {}))
        output = output.to(torch.promote_types(output.dtype, torch.float32))
        mean_out, _ = self.base.split_model_output(output, x)
        # 2. data prediction x_theta(x_t, t) of each parameterisation (DDPM eq. 15 for eps)
        alpha, sigma = level.alpha, level.sigma
        if self.base.mean_type == "eps":
            x0 = (x - sigma * mean_out) / alpha
        elif self.base.mean_type == "x0":
            x0 = mean_out
        elif self.base.mean_type == "v":  # Salimans & Ho 2022, Sec. 4
            x0 = alpha * x - sigma * mean_out
        else:  # mu = c1_t x_0 + c2_t x_t (DDPM eq. 7)
            c1 = float(np.interp(level.time, self._steps, self._coef1))
            c2 = float(np.interp(level.time, self._steps, self._coef2))
            x0 = (mean_out - c2 * x) / c1
        # 3. classifier guidance: eps <- eps - sigma_t grad_x log p(y | x_t) (Dhariwal & Nichol 2021, Alg. 2)
        if cond_fn is not None:
            eps = (x - alpha * x0) / sigma - sigma * cond_fn(x, t)
            x0 = (x - sigma * eps) / alpha
        # 4. bound it to the data range (clip or dynamic thresholding)
        x0 = Threshold.of(clip_denoised)(x0)
        return {"pred_x0": x0, "pred_eps": (x - alpha * x0) / sigma, "t": t}


def _denoise(schedule: SolverSchedule, model: Model, x: torch.Tensor, level: Level, run: ReverseRun) -> torch.Tensor:
    return schedule.denoise(model, x, level, **run.denoise_kwargs)["pred_x0"]


# --- DPM-Solver++ -----------------------------------------------------------------------------------
def _multistep_order(order: int, available: int, k: int, num_steps: int) -> int:
    """The order of the step at index k: warm-up with as many earlier predictions as there are, first order
    into the clean end, at most second order just before it for fewer than 15 steps (diffusers'
    lower_order_final, which steadies small step counts)."""
    if k == 0:
        return 1
    if k == 1 and num_steps < 15:
        return min(order, available, 2)
    return min(order, available)


def dpmpp_multistep(
    schedule: SolverSchedule,
    model: Model,
    x: torch.Tensor,
    t: torch.Tensor,
    run: ReverseRun,
    *,
    order: int,
    sde: bool = False,
) -> dict:
    """One step of multistep DPM-Solver++ (Lu et al. 2022, "DPM-Solver++"; 2M is their Alg. 2, 3M the third-order
    multistep update of their reference code) from level k to k - 1 with data predictions D_j = x_theta at the
    last `order` levels; sde=True: SDE-DPM-Solver++(2M), the same midpoint rule on the reverse SDE (diffusers'
    sde-dpmsolver++). x [N x C x H x W] -> dict(sample, pred_x0)."""
    k = run.state["index"]
    here, there = schedule.level(k), schedule.level(k - 1)
    # 1. data prediction at the current level, kept with the earlier ones (newest last)
    x0 = _denoise(schedule, model, x, here, run)
    history = run.state.setdefault("x0", [])
    history.append((k, x0))
    del history[:-order]
    p = _multistep_order(order, len(history), k, schedule.num_timesteps)
    # 2. h = lambda_{k-1} - lambda_k (infinite into the clean end, where sigma = 0 and e^{-h} = 0)
    h = there.log_snr - here.log_snr
    d0 = x0
    if p == 1:
        d = d0
    else:
        k1, m1 = history[-2]
        r0 = (here.log_snr - schedule.level(k1).log_snr) / h
        d1_0 = (d0 - m1) / r0
        if p == 2:
            d = d0 + 0.5 * d1_0  # 2M: midpoint rule (Alg. 2 line 6)
        else:
            k2, m2 = history[-3]
            r1 = (schedule.level(k1).log_snr - schedule.level(k2).log_snr) / h
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + r0 / (r0 + r1) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
    # 3. the exponential-integrator update
    if sde:  # x' = (sigma'/sigma) e^{-h} x + alpha' (1 - e^{-2h}) D + sigma' sqrt(1 - e^{-2h}) z
        sample = (there.sigma / here.sigma * math.exp(-h)) * x + (there.alpha * -math.expm1(-2.0 * h)) * d
        if there.sigma > 0:
            sample = sample + there.sigma * math.sqrt(-math.expm1(-2.0 * h)) * run.randn_like(x)
    elif p <= 2:  # x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) D   (first order: DDIM)
        sample = (there.sigma / here.sigma) * x - (there.alpha * math.expm1(-h)) * d
    else:  # 3M: D1 and D2 from the last three predictions (diffusers' third-order update)
        phi1 = math.expm1(-h)
        sample = (
            (there.sigma / here.sigma) * x
            - (there.alpha * phi1) * d0
            + (there.alpha * (phi1 / h + 1.0)) * d1
            - (there.alpha * ((phi1 + h) / h**2 - 0.5)) * d2
        )
    return {"sample": sample, "pred_x0": x0}


def dpmpp_2m_step(schedule, model, x, t, run) -> dict:
    return dpmpp_multistep(schedule, model, x, t, run, order=2)


def dpmpp_3m_step(schedule, model, x, t, run) -> dict:
    return dpmpp_multistep(schedule, model, x, t, run, order=3)


def dpmpp_2m_sde_step(schedule, model, x, t, run) -> dict:
    return dpmpp_multistep(schedule, model, x, t, run, order=2, sde=True)


# --- UniPC ------------------------------------------------------------------------------------------
def _unipc_coefficients(rks: list[float], hh: float, order: int) -> tuple[np.ndarray, np.ndarray]:
    """R [p x p] with rows r_k^(i-1) and b [p] = phi_{i+1}(hh) i! / B(h) of UniPC's order conditions (Zhao et
    al. 2023, "UniPC") for B(h) = e^hh - 1 (bh2), hh = -h (data prediction)."""
    b_h = math.expm1(hh)
    h_phi_k = math.expm1(hh) / hh - 1.0
    factorial, rows, b = 1, [], []
    for i in range(1, order + 1):
        rows.append([r ** (i - 1) for r in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial
    return np.array(rows, dtype=np.float64), np.array(b, dtype=np.float64)


def _unipc_update(
    schedule: SolverSchedule,
    x: torch.Tensor,
    s0: int,
    target: int,
    history: list,
    order: int,
    x0_target: torch.Tensor | None,
) -> torch.Tensor:
    """UniP-p from level s0 to `target` with the data predictions `history` [(index, x0), ...] (newest, at
    s0, last) when x0_target is None; else UniC-p: the same step corrected with x0_target, the prediction at
    `target` (x the state at s0)."""
    here, there = schedule.level(s0), schedule.level(target)
    h = there.log_snr - here.log_snr
    m0 = history[-1][1]
    # 1. scaled differences D1_i = (m_i - m0) / r_i of the earlier predictions, r_i = (lambda_si - lambda_s0) / h
    rks, d1s = [], []
    for i in range(1, order):
        k_i, m_i = history[-(i + 1)]
        r = (schedule.level(k_i).log_snr - here.log_snr) / h
        rks.append(r)
        d1s.append((m_i - m0) / r)
    # 2. the first-order (DDIM) part x' = (sigma'/sigma) x - alpha' (e^{-h} - 1) m0
    hh = -h
    h_phi_1 = math.expm1(hh)
    sample = (there.sigma / here.sigma) * x - (there.alpha * h_phi_1) * m0
    if x0_target is None and order == 1:
        return sample
    R, b = _unipc_coefficients(rks + [1.0], hh, order)
    b_h = math.expm1(hh)
    if x0_target is None:  # 3. predictor UniP-p: rho_p solves R[:-1, :-1] rho = b[:-1] (1/2 at order 2)
        rhos = [0.5] if order == 2 else np.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        return sample - (there.alpha * b_h) * sum(rho * d for rho, d in zip(rhos, d1s))
    # 4. corrector UniC-p: rho_c solves R rho = b (1/2 at order 1), the last weight on D1_t = x0_target - m0
    rhos = [0.5] if order == 1 else np.linalg.solve(R, b).tolist()
    correction = sum((rho * d for rho, d in zip(rhos[:-1], d1s)), torch.zeros_like(x)) + rhos[-1] * (x0_target - m0)
    return sample - (there.alpha * b_h) * correction


def unipc_step(schedule: SolverSchedule, model: Model, x: torch.Tensor, t: torch.Tensor, run: ReverseRun) -> dict:
    """One step of UniPC with B(h) = e^h - 1 (bh2) on data predictions (Zhao et al. 2023; diffusers'
    UniPCMultistepScheduler): the network's prediction at level k first corrects the state the previous
    predictor reached (UniC, no extra network call), then the predictor UniP moves it to level k - 1.
    x [N x C x H x W] -> dict(sample, pred_x0)."""
    state = run.state
    k, order = state["index"], run.options.solver_order
    x0 = _denoise(schedule, model, x, schedule.level(k), run)
    history = state.setdefault("x0", [])
    # 1. corrector: redo the last step from its start with this prediction
    if history:
        x = _unipc_update(schedule, state["last_sample"], k + 1, k, history, state["order"], x0_target=x0)
    history.append((k, x0))
    del history[:-order]
    # 2. predictor of order min(p, steps left, predictions available) (lower_order_final and warm-up)
    state["order"] = p = min(order, k + 1, len(history))
    state["last_sample"] = x
    sample = _unipc_update(schedule, x, k, k - 1, history, p, x0_target=None)
    return {"sample": sample, "pred_x0": x0}


# --- EDM Euler / Heun -------------------------------------------------------------------------------
def edm_step(
    schedule: SolverSchedule, model: Model, x: torch.Tensor, t: torch.Tensor, run: ReverseRun, *, heun: bool
) -> dict:
    """One step of EDM's sampler (Karras et al. 2022, Alg. 1; Alg. 2's churn when s_churn > 0) on the model's
    noise levels sigma = sigma_t / alpha_t, in EDM's variable x / alpha_t (s(t) = 1 there); Euler, or Heun's
    second-order correction for every step but the last into sigma = 0. x [N x C x H x W] (the VP state at
    level k) -> dict(sample at level k - 1, pred_x0)."""
    k = run.state["index"]
    here, there = schedule.level(k), schedule.level(k - 1)
    x_cur = x / here.alpha

    def denoiser(x_hat: torch.Tensor, level: Level) -> torch.Tensor:  # D(x; sigma), network input x alpha_t
        return _denoise(schedule, model, x_hat * level.alpha, level, run)

    # 1. churn: raise the noise to sigma_hat = (1 + gamma) sigma (Alg. 2 lines 4-6), at most the noisiest
    #    training level
    gamma = min(run.options.s_churn / schedule.num_timesteps, math.sqrt(2.0) - 1.0)
    level_hat = here
    if gamma > 0:
        level_hat = schedule.level_at_noise(here.noise * (1.0 + gamma))
        if level_hat.noise > here.noise:
            x_cur = x_cur + math.sqrt(level_hat.noise**2 - here.noise**2) * run.randn_like(x)
        else:
            level_hat = here
    sigma_hat, sigma_next = level_hat.noise, there.noise
    # 2. Euler step (Alg. 1 lines 4-5): d = (x - D(x; sigma)) / sigma
    denoised = denoiser(x_cur, level_hat)
    d = (x_cur - denoised) / sigma_hat
    x_next = x_cur + (sigma_next - sigma_hat) * d
    # 3. Heun's correction (lines 6-8), unless the step ends at sigma = 0
    if heun and sigma_next > 0:
        d_next = (x_next - denoiser(x_next, there)) / sigma_next
        x_next = x_cur + (sigma_next - sigma_hat) * (0.5 * d + 0.5 * d_next)
    return {"sample": x_next * there.alpha, "pred_x0": denoised}


def euler_step(schedule, model, x, t, run) -> dict:
    return edm_step(schedule, model, x, t, run, heun=False)


def heun_step(schedule, model, x, t, run) -> dict:
    return edm_step(schedule, model, x, t, run, heun=True)
