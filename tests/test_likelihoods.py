"""Gaussian KL and the discretized Gaussian decoder likelihood against closed forms and scipy."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from scipy.special import log_ndtr

from src.diffusion import discretized_gaussian_log_likelihood, normal_kl

HALF_BIN = 1.0 / 255.0  # half of the 8-bit bin width 2/255 on [-1, 1]


def kl_closed_form(m1, v1, m2, v2):
    """KL(N(m1, v1) || N(m2, v2)) in nats."""
    return 0.5 * (np.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1.0)


def test_normal_kl_matches_closed_form():
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=1000), rng.normal(size=1000)
    lv1, lv2 = rng.uniform(-8.0, 2.0, size=1000), rng.uniform(-8.0, 2.0, size=1000)
    got = normal_kl(*(torch.from_numpy(a) for a in (m1, lv1, m2, lv2))).numpy()
    np.testing.assert_allclose(got, kl_closed_form(m1, np.exp(lv1), m2, np.exp(lv2)), rtol=1e-10, atol=1e-12)
    # KL of a distribution to itself is zero, and KL is never negative.
    assert np.allclose(normal_kl(*(torch.from_numpy(a) for a in (m1, lv1, m1, lv1))).numpy(), 0.0, atol=1e-12)
    assert (got >= 0).all()


def test_normal_kl_broadcasts():
    mean1 = torch.tensor([[0.0, 1.0, -2.0]], dtype=torch.float64)  # [1, 3]
    logvar2 = torch.tensor([[0.0], [1.5]], dtype=torch.float64)  # [2, 1]
    got = normal_kl(mean1, torch.tensor(-1.0, dtype=torch.float64), 0.5, logvar2)
    assert got.shape == (2, 3)
    expected = kl_closed_form(mean1.numpy(), math.exp(-1.0), 0.5, np.exp(logvar2.numpy()))
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("m1,s1,m2,s2", [(0.0, 1.0, 0.0, 1.0), (0.3, 0.5, -0.2, 1.3), (1.0, 2.0, 0.0, 0.7)])
def test_normal_kl_matches_numerical_integral(m1, s1, m2, s2):
    p, q = stats.norm(m1, s1), stats.norm(m2, s2)
    integral, _ = integrate.quad(
        lambda x: p.pdf(x) * (p.logpdf(x) - q.logpdf(x)),
        m1 - 15 * s1,
        m1 + 15 * s1,
        epsabs=1e-12,
        epsrel=1e-10,
        limit=200,
    )
    got = normal_kl(
        torch.tensor(m1, dtype=torch.float64),
        torch.tensor(2 * math.log(s1), dtype=torch.float64),
        torch.tensor(m2, dtype=torch.float64),
        torch.tensor(2 * math.log(s2), dtype=torch.float64),
    )
    assert got.item() == pytest.approx(integral, rel=1e-8, abs=1e-10)


def reference_log_prob(k: np.ndarray, mean: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """log P(bin k) of N(mean, scale^2) on the 8-bit grid x_k = k/127.5 - 1, outer bins open-ended,
    computed with scipy's (log) CDF and survival function on the side of the mean where it is accurate."""
    x = k / 127.5 - 1.0
    upper = (x + HALF_BIN - mean) / scale
    lower = (x - HALF_BIN - mean) / scale
    # Left of the mean use the CDF, right of it the survival function, both in log space:
    # log(F(u) - F(l)) = log F(u) + log1p(-F(l)/F(u)).
    # (The branch not selected below may be -inf where its side underflows; hence the errstate.)
    with np.errstate(divide="ignore", invalid="ignore"):
        left = stats.norm.logcdf(upper) + np.log1p(-np.exp(stats.norm.logcdf(lower) - stats.norm.logcdf(upper)))
        right = stats.norm.logsf(lower) + np.log1p(-np.exp(stats.norm.logsf(upper) - stats.norm.logsf(lower)))
    interior = np.where(lower > 0, right, left)
    out = np.where(k == 0, stats.norm.logcdf(upper), np.where(k == 255, stats.norm.logsf(lower), interior))
    # Sanity of the reference itself: agrees with the naive difference where that is well conditioned.
    naive = np.log(np.clip(stats.norm.cdf(upper) - stats.norm.cdf(lower), 1e-300, None))
    ok = (k > 0) & (k < 255) & (naive > -10)
    np.testing.assert_allclose(out[ok], naive[ok], rtol=1e-7, atol=1e-12)
    return out


def random_inputs(n: int, seed: int):
    rng = np.random.default_rng(seed)
    k = rng.integers(0, 256, size=n)
    k[:20] = 0  # make sure both edge bins are exercised
    k[20:40] = 255
    means = rng.uniform(-1.2, 1.2, size=n)
    # log scales from very small (scale ~ 1e-3, well under the bin width) to ~ 1.6
    log_scales = rng.uniform(-7.0, 0.5, size=n)
    # Put some means right next to their own pixel (inside or just outside its bin of half-width
    # 1/255 ~ 0.0039) with small scales, so probabilities near 1 and steep tails both occur.
    near = rng.random(n) < 0.3
    means[near] = k[near] / 127.5 - 1.0 + rng.uniform(-0.006, 0.006, size=near.sum())
    log_scales[near] = rng.uniform(-9.0, -5.0, size=near.sum())
    return k, means, log_scales


def test_discretized_gaussian_matches_scipy():
    k, means, log_scales = random_inputs(20000, seed=1)
    x = torch.from_numpy(k / 127.5 - 1.0)
    got = discretized_gaussian_log_likelihood(x, torch.from_numpy(means), torch.from_numpy(log_scales)).numpy()
    ref = reference_log_prob(k, means, np.exp(log_scales))
    assert got.shape == ref.shape and np.isfinite(got).all()
    # Where the bin probability is representable (> 1e-10) the two agree tightly; smaller interior
    # probabilities are floored at a tiny value, which must stay below the threshold.
    representable = ref > math.log(1e-10)
    assert representable.mean() > 0.3 and (~representable).sum() > 100
    np.testing.assert_allclose(got[representable], ref[representable], rtol=1e-6, atol=1e-9)
    assert (got[~representable] <= math.log(1e-10) + 1e-6).all()
    # The edge bins are open-ended tails: exact far into the tail (no floor there).
    edges = (k == 0) | (k == 255)
    np.testing.assert_allclose(got[edges], ref[edges], rtol=1e-6, atol=1e-9)
    # Probabilities near 1 (mean inside its own bin, tiny scale) come out as log p ~ 0.
    assert (ref > -1e-3).sum() > 500


def test_discretized_gaussian_float32_inputs():
    k, means, log_scales = random_inputs(5000, seed=2)
    x = torch.from_numpy(k / 127.5 - 1.0).float()
    got = (
        discretized_gaussian_log_likelihood(x, torch.from_numpy(means).float(), torch.from_numpy(log_scales).float())
        .double()
        .numpy()
    )
    ref = reference_log_prob(
        k, means.astype(np.float32).astype(np.float64), np.exp(log_scales.astype(np.float32).astype(np.float64))
    )
    # float32 edges x +- 1/255 carry ~6e-8 absolute error, relative to scales down to 1e-3.
    big = ref > math.log(1e-4)
    np.testing.assert_allclose(got[big], ref[big], rtol=2e-3, atol=2e-4)


@pytest.mark.parametrize("mean,scale", [(0.1, 0.2), (-0.97, 0.05), (0.999, 0.003), (0.0, 3.0), (0.3, 1e-3)])
def test_discretized_gaussian_bins_sum_to_one(mean, scale):
    k = np.arange(256)
    x = torch.from_numpy(k / 127.5 - 1.0)
    log_p = discretized_gaussian_log_likelihood(
        x, torch.full((256,), mean, dtype=torch.float64), torch.full((256,), math.log(scale), dtype=torch.float64)
    )
    assert torch.exp(log_p).sum().item() == pytest.approx(1.0, abs=1e-9)
    # Each bin also matches the CDF difference computed with scipy.
    np.testing.assert_allclose(torch.exp(log_p).numpy(), np.exp(reference_log_prob(k, mean, scale)), atol=1e-10)


def test_discretized_gaussian_edge_bins_are_tails():
    # With the mean far outside [-1, 1] the whole mass falls in an edge bin: log p -> 0 there, and the
    # opposite edge is a deep tail still computed without underflow.
    x = torch.tensor([-1.0, 1.0, -1.0, 1.0], dtype=torch.float64)
    means = torch.tensor([-3.0, 3.0, 3.0, -3.0], dtype=torch.float64)
    log_scales = torch.full((4,), math.log(0.1), dtype=torch.float64)
    got = discretized_gaussian_log_likelihood(x, means, log_scales).numpy()
    assert got[:2] == pytest.approx([0.0, 0.0], abs=1e-12)
    expected_tail = log_ndtr((-1.0 + HALF_BIN - 3.0) / 0.1)  # ~ -800 nats, far below float64's tiny
    np.testing.assert_allclose(got[2:], [expected_tail, expected_tail], rtol=1e-9)


def test_discretized_gaussian_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        discretized_gaussian_log_likelihood(torch.zeros(3), torch.zeros(4), torch.zeros(3))
