"""Post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2,
Sec. 3 and Appendix C): the EMA length is chosen after training, as a least-squares combination of snapshots of
power-function EMAs taken during training.

Notation (steps are optimizer steps, 1-based: t = 1 is the average after the first update):
- A power-function EMA with exponent gamma averages the parameters theta_tau of steps tau <= t with the profile
      p_{t,gamma}(tau) = (gamma + 1) tau^gamma / t^(gamma + 1),   0 < tau <= t                 (EDM2 Eq. 7 / C.2)
  and is tracked step by step as ema_t = beta_t ema_{t-1} + (1 - beta_t) theta_t with
      beta_t = (1 - 1/t)^(gamma + 1)                                                           (EDM2 Eq. 3 / C.3)
  (beta_1 = 0: the average starts at the first step's weights, whatever the initialisation).
- Its width relative to its length t, sigma_rel, is
      sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3))                                  (EDM2 Eq. 4)
  so gamma is the largest real root of the cubic gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s), s = sigma_rel^-2.
- The inner product of two profiles, t_a <= t_b, over tau in (0, t_a]:
      <p_{t_a,a}, p_{t_b,b}> = (a + 1)(b + 1) / ((a + b + 1) t_b) * (t_a / t_b)^b               (EDM2 Eq. C.10)
- Given snapshots i (step t_i, exponent gamma_i), the coefficients x of the combination sum_i x_i p_i closest in
  L2 to the target profile p* are the least-squares solution of A x = b with A_ij = <p_i, p_j>, b_i = <p_i, p*>
  (EDM2 Eq. C.11-C.13); the averaged weights are then sum_i x_i snapshot_i.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch

# The files of the post-hoc EMA snapshots in <run>/checkpoints/phema (written by src.callbacks.PostHocEMA).
SNAPSHOT_GLOB = "phema-*.pt"

# gamma >= 0 (weights that never grow into the past): sigma_rel <= sigma_rel(0) = 1 / sqrt(12).
MAX_STD = 1.0 / math.sqrt(12.0)


def check_std(sigma_rel: float, name: str = "ema std") -> float:
    """sigma_rel as a float in (0, MAX_STD], or a one-line ValueError naming the range."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not 0.0 < sigma_rel <= MAX_STD:
        raise ValueError(
            f"{name} must be a number in (0, {MAX_STD:.4f}] (relative width of the EMA profile, "
            f"e.g. 0.05 or 0.10), got {sigma_rel!r}"
        )
    return float(sigma_rel)


def gamma_to_std(gamma: float) -> float:
    """sigma_rel of the power-function profile of exponent gamma (EDM2 Eq. 4)."""
    gamma = float(gamma)
    return math.sqrt((gamma + 1.0) / ((gamma + 2.0) ** 2 * (gamma + 3.0)))


def std_to_gamma(sigma_rel: float) -> float:
    """The exponent gamma >= 0 whose profile has relative width sigma_rel (the inverse of gamma_to_std): the largest
    real root of gamma^3 + 7 gamma^2 + (16 - s) gamma + (12 - s) = 0 with s = sigma_rel^-2 (EDM2 Eq. 4 rearranged)."""
    s = check_std(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) < 1e-9 * max(1.0, abs(r.real))))


def power_beta(gamma: float, step: int) -> float:
    """beta_t = (1 - 1/t)^(gamma + 1), the decay of the tracked EMA's update at step t >= 1 (EDM2 Eq. C.3)."""
    if step < 1:
        raise ValueError(f"steps are 1-based, got {step}")
    return (1.0 - 1.0 / step) ** (gamma + 1.0)


def profile_inner_products(steps_a, gammas_a, steps_b, gammas_b) -> np.ndarray:
    """<p_{t_a,gamma_a}, p_{t_b,gamma_b}> for every pair, broadcast like numpy (EDM2 Eq. C.10): with t_lo the
    earlier and t_hi the later step and g_hi the exponent of the later profile,
        (a + 1)(b + 1) / ((a + b + 1) t_hi) * (t_lo / t_hi)^g_hi."""
    t_a, a = np.asarray(steps_a, dtype=np.float64), np.asarray(gammas_a, dtype=np.float64)
    t_b, b = np.asarray(steps_b, dtype=np.float64), np.asarray(gammas_b, dtype=np.float64)
    t_a, a, t_b, b = np.broadcast_arrays(t_a, a, t_b, b)
    a_first = t_a <= t_b
    t_lo, t_hi = np.where(a_first, t_a, t_b), np.where(a_first, t_b, t_a)
    g_hi = np.where(a_first, b, a)
    return (a + 1.0) * (b + 1.0) / ((a + b + 1.0) * t_hi) * (t_lo / t_hi) ** g_hi


def solve_coefficients(
    steps: Sequence[int], gammas: Sequence[float], target_step: int, target_gamma: float
) -> tuple[np.ndarray, float]:
    """The coefficients x [N] of the snapshots (steps[i], gammas[i]) whose combination best matches the profile
    of exponent target_gamma at target_step (EDM2 Eq. C.11-C.13: least squares A x = b with the Gram matrix of the
    snapshots' profiles and their inner products with the target), and the fit's relative L2 error
    ||sum_i x_i p_i - p*|| / ||p*|| from the same closed forms."""
    t, g = np.asarray(steps, dtype=np.float64), np.asarray(gammas, dtype=np.float64)
    if t.ndim != 1 or t.shape != g.shape or len(t) == 0:
        raise ValueError("solve_coefficients needs one gamma per snapshot step and at least one snapshot")
    gram = profile_inner_products(t[:, None], g[:, None], t[None, :], g[None, :])  # A [N x N]
    rhs = profile_inner_products(t, g, float(target_step), float(target_gamma))  # b [N]
    x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
    target_norm2 = float(profile_inner_products(target_step, target_gamma, target_step, target_gamma))
    # ||A-combination - p*||^2 = x^T A x - 2 x^T b + <p*, p*>; clipped at 0 against rounding
    residual2 = max(float(x @ gram @ x - 2.0 * x @ rhs + target_norm2), 0.0)
    return x, math.sqrt(residual2 / target_norm2)


def combine(weighted: Iterable[tuple[float, Mapping[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """sum_i x_i * tensors_i[name] for every name over the (x_i, tensors_i) pairs, accumulated in float64 (one
    snapshot in memory at a time when `weighted` is a generator) and returned in each tensor's own dtype."""
    totals: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    for x, tensors in weighted:
        if not totals:
            totals = {name: torch.zeros(t.shape, dtype=torch.float64, device=t.device) for name, t in tensors.items()}
            dtypes = {name: t.dtype for name, t in tensors.items()}
        elif tensors.keys() != totals.keys():
            raise ValueError("the snapshots hold different tensors; they are not of one network")
        for name, tensor in tensors.items():
            totals[name].add_(tensor.to(torch.float64), alpha=float(x))
    if not totals:
        raise ValueError("combine needs at least one snapshot")
    return {name: total.to(dtypes[name]) for name, total in totals.items()}
