"""End-to-end checks of the bound and the sampler with an analytically optimal model.

Data: each pixel x_0 ~ N(m, s^2) discretized to the 8-bit grid. For Gaussian data the posterior
x_0 | x_t is Gaussian, so the optimal eps-prediction and the exact reverse variance are closed forms:

    eps*(x_t, t)  = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m) / (abar_t s^2 + 1 - abar_t)
    Var(x_0|x_t)  = s^2 (1 - abar_t) / (abar_t s^2 + 1 - abar_t)
    sigma*_t^2    = beta~_t + c1_t^2 Var(x_0|x_t),   c1_t = beta_t sqrt(abar_{t-1}) / (1 - abar_t)

sigma*_t^2 lies in [beta~_t, beta_t], so a learned_range model expresses it exactly. With it the full-T
bound must come down to the entropy of the discretized data; with fixed_small it stays well above.
Everything here is computed in numpy from the betas, independently of the implementation's buffers.
"""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from src.diffusion import GaussianDiffusion, ddpm_sample

M, S, T = 0.1, 0.2, 1000
LN2 = math.log(2.0)

# --- the schedule and the oracle, in numpy ------------------------------------------------------
BETAS = np.linspace(1e-4, 0.02, T)  # DDPM's linear schedule
ABAR = np.cumprod(1.0 - BETAS)
ABAR_PREV = np.concatenate([[1.0], ABAR[:-1]])
BETA_TILDE = BETAS * (1.0 - ABAR_PREV) / (1.0 - ABAR)
LOG_BETA_TILDE_CLIPPED = np.log(np.concatenate([[BETA_TILDE[1]], BETA_TILDE[1:]]))  # beta~_0 = 0
C1 = BETAS * np.sqrt(ABAR_PREV) / (1.0 - ABAR)
C2 = np.sqrt(1.0 - BETAS) * (1.0 - ABAR_PREV) / (1.0 - ABAR)
Q = ABAR * S**2 + 1.0 - ABAR  # Var(x_t)
GAIN = S**2 * np.sqrt(ABAR) / Q  # E[x_0 | x_t] = m + GAIN (x_t - sqrt(abar) m)
VAR_X0_GIVEN_XT = S**2 * (1.0 - ABAR) / Q
VAR_STAR = BETA_TILDE + C1**2 * VAR_X0_GIVEN_XT
# learned_range: log sigma^2 = frac log beta + (1 - frac) log beta~ (clipped), v = 2 frac - 1
FRAC = (np.log(VAR_STAR) - LOG_BETA_TILDE_CLIPPED) / (np.log(BETAS) - LOG_BETA_TILDE_CLIPPED)
V_STAR = np.clip(2.0 * FRAC - 1.0, -1.0, 1.0)

# The discretized data distribution: bin k holds x_k = k/127.5 - 1, the outer bins are open-ended.
GRID = np.arange(256) / 127.5 - 1.0
BIN_EDGES = np.concatenate([[-np.inf], GRID[1:] - 1.0 / 255.0, [np.inf]])
P_DATA = np.diff(stats.norm.cdf(BIN_EDGES, loc=M, scale=S))
ENTROPY_BITS = -np.sum(P_DATA[P_DATA > 0] * np.log2(P_DATA[P_DATA > 0]))
D_DATA = np.sum(P_DATA * (GRID - M) ** 2)  # E[(x_0 - m)^2] of the discretized data (~ s^2)
# E[(x_0 - E*[x_0|x_t])^2] for the linear (Gaussian-data) predictor, exact for the discretized data too.
XSTART_MSE = (1.0 - GAIN * np.sqrt(ABAR)) ** 2 * D_DATA + GAIN**2 * (1.0 - ABAR)
EPS_MSE = (1.0 - (1.0 - ABAR) / Q) ** 2 + (1.0 - ABAR) * ABAR * D_DATA / Q**2

# The bound's Monte Carlo standard error at this size: ~0.009 bits/dim (fixed_small ~0.016), measured
# over seeds; almost all of it comes from the decoder and the first ~10 steps.
N_PIXELS = 128 * 16 * 16


def expected_bound_bits(log_var: np.ndarray) -> dict:
    """E over data and noise of each term of the bound for the eps* mean and the given reverse log
    variances [T], in bits/dim: KL terms in closed form, the decoder by Gauss-Hermite quadrature."""
    var = np.exp(log_var)
    kl = 0.5 * (log_var - LOG_BETA_TILDE_CLIPPED + BETA_TILDE / var - 1.0 + C1**2 * XSTART_MSE / var)
    # Decoder: x_1 = sqrt(abar_0) x_k + sqrt(1 - abar_0) z; the model mean at t=0 is E*[x_0 | x_1].
    z, w = np.polynomial.hermite_e.hermegauss(60)
    w = w / w.sum()
    keep = P_DATA > 1e-15
    xk = GRID[keep, None]
    mean = M + GAIN[0] * (np.sqrt(ABAR[0]) * xk + np.sqrt(1.0 - ABAR[0]) * z[None, :] - np.sqrt(ABAR[0]) * M)
    sd = math.sqrt(var[0])
    upper = np.where(xk > 0.999, np.inf, xk + 1.0 / 255.0)
    lower = np.where(xk < -0.999, -np.inf, xk - 1.0 / 255.0)
    zu, zl = (upper - mean) / sd, (lower - mean) / sd
    prob = np.where(zl > 0, stats.norm.sf(zl) - stats.norm.sf(zu), stats.norm.cdf(zu) - stats.norm.cdf(zl))
    decoder = np.sum(P_DATA[keep, None] * w[None, :] * -np.log(prob))
    a = ABAR[-1]
    prior = 0.5 * (-np.log(1.0 - a) + (1.0 - a) + a * np.sum(P_DATA * GRID**2) - 1.0)
    terms = np.concatenate([[decoder], kl[1:]]) / LN2
    return {"terms": terms, "prior": prior / LN2, "total": terms.sum() + prior / LN2}


LEARNED_LOG_VAR = (V_STAR + 1) / 2 * np.log(BETAS) + (1 - (V_STAR + 1) / 2) * LOG_BETA_TILDE_CLIPPED
EXPECTED_LEARNED = expected_bound_bits(LEARNED_LOG_VAR)
EXPECTED_FIXED_SMALL = expected_bound_bits(LOG_BETA_TILDE_CLIPPED)


# --- the models --------------------------------------------------------------------------------
_ABAR_T = torch.from_numpy(ABAR)
_V_T = torch.from_numpy(V_STAR)


def eps_star(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    a = _ABAR_T[t].to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
    return torch.sqrt(1.0 - a) * (xt - torch.sqrt(a) * M) / (a * S**2 + 1.0 - a)


def learned_oracle(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    eps = eps_star(xt, t)
    v = _V_T[t].to(xt.dtype).view(-1, *([1] * (xt.ndim - 1))).expand_as(eps)
    return torch.cat([eps, v], dim=1)


def make_learned() -> GaussianDiffusion:
    return GaussianDiffusion(torch.from_numpy(BETAS), mean_type="eps", var_type="learned_range", loss_type="vlb")


def make_fixed_small() -> GaussianDiffusion:
    return GaussianDiffusion(torch.from_numpy(BETAS), mean_type="eps", var_type="fixed_small", loss_type="simple")


def stratified_data() -> torch.Tensor:
    """N_PIXELS draws of the discretized N(m, s^2) by stratified inverse-CDF sampling (quantiles
    (i + 1/2)/N, shuffled), so the data's own sampling noise does not enter the comparison."""
    quantiles = (np.arange(N_PIXELS) + 0.5) / N_PIXELS
    k = np.searchsorted(np.cumsum(P_DATA), quantiles)
    np.random.default_rng(0).shuffle(k)
    return torch.from_numpy(GRID[k].reshape(-1, 1, 16, 16))


# The loops below run ~10^4 small elementwise ops: one intra-op thread (conftest.single_thread).
pytestmark = pytest.mark.usefixtures("single_thread")


# --- the oracle itself -------------------------------------------------------------------------
def test_exact_reverse_variance_lies_in_the_learned_range():
    assert ((FRAC >= 0.0) & (FRAC <= 1.0)).all()  # sigma*^2 in [beta~ (clipped at t=0), beta]
    np.testing.assert_allclose(V_STAR, 2.0 * FRAC - 1.0)
    # The implementation's interpolation turns v* back into sigma*^2 at every t.
    t = torch.arange(T)
    xt = torch.zeros(T, 1, 1, 1, dtype=torch.float64)
    out = make_learned().p_mean_variance(learned_oracle, xt, t)
    np.testing.assert_allclose(out["variance"].numpy().ravel(), VAR_STAR, rtol=1e-9)


def test_oracle_bound_closed_form_reaches_the_entropy():
    # The bound is >= the cross-entropy >= the entropy; with the exact variance the gap is tiny.
    assert ENTROPY_BITS == pytest.approx(6.7196, abs=1e-4)
    assert 0.0 <= EXPECTED_LEARNED["total"] - ENTROPY_BITS < 0.005
    assert EXPECTED_FIXED_SMALL["total"] - ENTROPY_BITS > 0.6


# --- the full-T bound --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data() -> torch.Tensor:
    return stratified_data()


@pytest.fixture(scope="module")
def bpd_learned(data):
    return make_learned().calc_bpd_loop(learned_oracle, data, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def bpd_fixed_small(data):
    return make_fixed_small().calc_bpd_loop(eps_star, data, generator=torch.Generator().manual_seed(0))


def test_bpd_with_exact_variance_matches_the_data_entropy(bpd_learned):
    bpd = bpd_learned["total_bpd"].mean().item()
    print(
        f"learned_range oracle: {bpd:.4f} bits/dim, expected {EXPECTED_LEARNED['total']:.4f}, "
        f"entropy {ENTROPY_BITS:.4f}"
    )
    # Monte Carlo standard error ~0.009 bits/dim: 0.05 is more than 5 of them.
    assert abs(bpd - ENTROPY_BITS) < 0.05
    assert abs(bpd - EXPECTED_LEARNED["total"]) < 0.05
    assert bpd_learned["total_bpd"].shape == (N_PIXELS // 256,)


def test_bpd_with_fixed_small_variance_stays_above(bpd_learned, bpd_fixed_small):
    bpd = bpd_fixed_small["total_bpd"].mean().item()
    print(f"fixed_small oracle: {bpd:.4f} bits/dim, expected {EXPECTED_FIXED_SMALL['total']:.4f}")
    assert abs(bpd - EXPECTED_FIXED_SMALL["total"]) < 0.07  # ~7.46; Monte Carlo standard error ~0.016
    assert bpd - bpd_learned["total_bpd"].mean().item() > 0.5


@pytest.mark.parametrize("which", ["learned", "fixed_small"])
def test_bpd_terms_per_timestep(which, bpd_learned, bpd_fixed_small, data):
    out, expected = {
        "learned": (bpd_learned, EXPECTED_LEARNED),
        "fixed_small": (bpd_fixed_small, EXPECTED_FIXED_SMALL),
    }[which]
    vb = out["vb"].double().mean(dim=0).numpy()  # [T], term t at column t
    assert out["vb"].shape == (N_PIXELS // 256, T)
    # Decoder NLL at t=0 (~2.4-2.5 bits) and blocks of KL terms, each against the closed form.
    assert vb[0] == pytest.approx(expected["terms"][0], abs=0.04)  # standard error <= 0.01
    for lo, hi in [(1, 10), (10, 100), (100, 400), (400, 1000)]:
        assert vb[lo:hi].sum() == pytest.approx(expected["terms"][lo:hi].sum(), rel=0.03, abs=0.005), (lo, hi)
    # The prior term is deterministic: KL(N(sqrt(abar_T) x_0, 1 - abar_T) || N(0, 1)) per image.
    a, x = ABAR[-1], data.numpy().reshape(data.shape[0], -1)
    prior = (0.5 * (-np.log(1 - a) + (1 - a) + a * x**2 - 1.0)).mean(axis=1) / LN2
    np.testing.assert_allclose(out["prior_bpd"].numpy(), prior, rtol=1e-6)
    np.testing.assert_allclose(out["total_bpd"].double().numpy(), out["vb"].double().sum(1).numpy() + prior, rtol=1e-5)


def test_bpd_loop_diagnostics_per_timestep(bpd_learned):
    # The x_0 and eps errors of the optimal predictor at each t, relative error of a mean of 32768
    # squares ~ sqrt(2/32768) ~ 0.8%; allow 6% (the largest of the 2000 deviations is ~2%).
    np.testing.assert_allclose(bpd_learned["xstart_mse"].double().mean(0).numpy(), XSTART_MSE, rtol=0.06)
    np.testing.assert_allclose(bpd_learned["mse"].double().mean(0).numpy(), EPS_MSE, rtol=0.06)


def test_rate_distortion_of_the_oracle_follows_its_closed_form(bpd_learned):
    """DDPM Fig. 5 from the oracle's NLL pass: the distortion is 127.5 * sqrt(E (x0_hat - x0)^2), whose closed form
    falls as t goes to 0, and the rate (prior plus the terms after t) rises."""
    from src.evaluation.figures import rate_distortion

    curve = rate_distortion({key: value.double().numpy() for key, value in bpd_learned.items()})
    distortion, rate = np.asarray(curve["distortion_rmse"]), np.asarray(curve["rate_bpd"])
    np.testing.assert_allclose(distortion, 127.5 * np.sqrt(XSTART_MSE), rtol=0.03)
    assert np.all(np.diff(127.5 * np.sqrt(XSTART_MSE)) > 0)  # the closed form: monotone in t
    assert distortion[0] < 2.0 and distortion[-1] > 20.0  # about a grey level at t=0, s * 127.5 = 25.5 at T
    assert np.all(np.diff(rate) <= 0) and rate[0] == pytest.approx(
        curve["lossless_bpd"] - bpd_learned["vb"][:, 0].double().mean().item(), rel=1e-6
    )


# --- sampling ----------------------------------------------------------------------------------
def chain_marginal(log_var: np.ndarray) -> tuple[float, float]:
    """Mean and std of x_0 from ancestral sampling with the eps* mean (linear in x_t) and the given
    reverse variances, x_T ~ N(0, 1), no noise added at the last step."""
    mean, var = 0.0, 1.0
    for t in range(T - 1, -1, -1):
        slope = C1[t] * GAIN[t] + C2[t]
        mean = slope * mean + C1[t] * M * (1.0 - GAIN[t] * np.sqrt(ABAR[t]))
        var = slope**2 * var + (math.exp(log_var[t]) if t > 0 else 0.0)
    return mean, math.sqrt(var)


@pytest.mark.parametrize("which", ["fixed_small", "learned"])
def test_ddpm_sample_reproduces_the_data_distribution(which):
    diffusion, model, log_var = {
        "fixed_small": (make_fixed_small(), eps_star, LOG_BETA_TILDE_CLIPPED),
        "learned": (make_learned(), learned_oracle, LEARNED_LOG_VAR),
    }[which]
    n = N_PIXELS
    x = ddpm_sample(diffusion, model, (n // 256, 1, 16, 16), generator=torch.Generator().manual_seed(1), device="cpu")
    assert x.shape == (n // 256, 1, 16, 16) and x.min() >= -1 and x.max() <= 1
    mean, std = x.double().mean().item(), x.double().std().item()
    print(f"{which}: sample mean {mean:.4f} std {std:.4f}")
    # The data: mean m, std s. Standard errors: s/sqrt(n) = 0.0011, s/sqrt(2n) = 0.0008.
    assert abs(mean - M) < 0.01
    assert abs(std - S) < 0.01
    # Tighter, against the exact marginal of this Gaussian chain (fixed_small ends at std 0.1963,
    # the exact variance at 0.1998): within 5 standard errors.
    chain_mean, chain_std = chain_marginal(log_var)
    assert abs(mean - chain_mean) < 5 * chain_std / math.sqrt(n)
    assert abs(std - chain_std) < 5 * chain_std / math.sqrt(2 * n)


def test_ddpm_sample_is_reproducible_with_a_seed():
    diffusion = make_fixed_small()
    a = ddpm_sample(diffusion, eps_star, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    b = ddpm_sample(diffusion, eps_star, (2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    c = ddpm_sample(diffusion, eps_star, (2, 1, 4, 4), generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
