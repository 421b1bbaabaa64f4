"""Interpolation and DDIM inversion against closed forms.

With Gaussian data x_0 ~ N(m, s^2) per pixel the optimal network is known (eps* below, from the base
schedule at the original timestep) and every DDIM step is affine in x, so the inversion, the decoder and
their composition are affine maps whose coefficients follow from the schedule (numpy, DDIM eq. 12).
"""

import math

import numpy as np
import pytest
import torch

from src.diffusion import GaussianDiffusion, SamplerOptions, space_timesteps
from src.diffusion.editing import ddim_invert, ddim_sample, interpolate, interpolate_ddim, lerp, slerp

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1.0 - BETAS)
M, S = 0.1, 0.2


pytestmark = pytest.mark.usefixtures("single_thread")


def make() -> GaussianDiffusion:
    return GaussianDiffusion(torch.from_numpy(BETAS), var_type="fixed_large")


_ABAR_T = torch.from_numpy(ABAR)


def oracle(xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """eps*(x_t, t) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m) / (abar_t s^2 + 1 - abar_t)."""
    a = _ABAR_T[t].to(xt.dtype).view(-1, *([1] * (xt.ndim - 1)))
    return torch.sqrt(1.0 - a) * (xt - torch.sqrt(a) * M) / (a * S**2 + 1.0 - a)


def data(n: int, seed: int, size: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (M + S * torch.randn(n, 1, size, size, generator=g, dtype=torch.float64)).clamp(-0.95, 0.95)


def posterior_x0(a: float) -> tuple[float, float]:
    """E[x_0 | x_t] = gain x_t + offset."""
    gain = S**2 * math.sqrt(a) / (a * S**2 + 1.0 - a)
    return gain, M * (1.0 - gain * math.sqrt(a))


def ddim_move(slope: float, shift: float, a_from: float, a_to: float) -> tuple[float, float]:
    """One deterministic DDIM move of x = slope x' + shift from noise level a_from to a_to, with x_0 and
    eps predicted from x at a_from: x_to = sqrt(a_to) x0_hat + sqrt(1 - a_to) eps (DDIM eq. 12, sigma = 0)."""
    gain, offset = posterior_x0(a_from)
    x0 = (gain * slope, gain * shift + offset)
    eps = (
        (slope - math.sqrt(a_from) * x0[0]) / math.sqrt(1 - a_from),
        (shift - math.sqrt(a_from) * x0[1]) / math.sqrt(1 - a_from),
    )
    return (
        math.sqrt(a_to) * x0[0] + math.sqrt(1 - a_to) * eps[0],
        math.sqrt(a_to) * x0[1] + math.sqrt(1 - a_to) * eps[1],
    )


def encoder_map(kept) -> tuple[float, float]:
    """ddim_invert as an affine map x_0 -> latent: from the image (abar = 1) to s_0 with eps at s_0,
    then s_k -> s_{k+1} with eps at s_k."""
    a = ABAR[np.asarray(kept)]
    # x_{s_0} = sqrt(a_0) x_0 + sqrt(1 - a_0) eps*(x_0, s_0)
    gain, offset = posterior_x0(a[0])
    eps = (1 - math.sqrt(a[0]) * gain) / math.sqrt(1 - a[0]), -math.sqrt(a[0]) * offset / math.sqrt(1 - a[0])
    slope, shift = math.sqrt(a[0]) + math.sqrt(1 - a[0]) * eps[0], math.sqrt(1 - a[0]) * eps[1]
    for k in range(len(a) - 1):
        slope, shift = ddim_move(slope, shift, a[k], a[k + 1])
    return slope, shift


def decoder_map(kept) -> tuple[float, float]:
    """DDIM eta=0 sampling as an affine map latent -> image (abar = 1 after the last step)."""
    a = ABAR[np.asarray(kept)]
    a_prev = np.concatenate([[1.0], a[:-1]])
    slope, shift = 1.0, 0.0
    for k in range(len(a) - 1, -1, -1):
        slope, shift = ddim_move(slope, shift, a[k], a_prev[k])
    return slope, shift


# --- lerp / slerp --------------------------------------------------------------------------------
def test_slerp_closed_form():
    a = torch.zeros(2, 3, dtype=torch.float64)
    b = torch.zeros(2, 3, dtype=torch.float64)
    a[:, 0], b[:, 1] = 2.0, 2.0  # orthogonal, equal norms: a great-circle arc
    lam = torch.tensor([0.0, 0.25, 0.5, 1.0])
    out = slerp(a, b, lam)
    assert out.shape == (2, 4, 3)
    angle = lam.double() * math.pi / 2
    np.testing.assert_allclose(out[0, :, 0].numpy(), 2 * torch.cos(angle).numpy(), atol=1e-12)
    np.testing.assert_allclose(out[0, :, 1].numpy(), 2 * torch.sin(angle).numpy(), atol=1e-12)
    np.testing.assert_allclose(out.norm(dim=-1).numpy(), 2.0, rtol=1e-12)  # a linear blend would shrink to sqrt(2)
    assert torch.equal(lerp(a, b, [0.5])[:, 0], (a + b) / 2)


def test_slerp_endpoints_and_parallel_fallback():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 4, 4, generator=g), torch.randn(3, 1, 4, 4, generator=g)
    out = slerp(a, b, [0.0, 1.0])
    torch.testing.assert_close(out[:, 0], a)
    torch.testing.assert_close(out[:, 1], b)
    # parallel inputs: the arc is degenerate and slerp is the linear blend
    torch.testing.assert_close(slerp(a, 3 * a, [0.5])[:, 0], 2 * a)


# --- interpolation (DDPM Sec. 4.4) -----------------------------------------------------------------
def test_interpolation_endpoints_reconstruct_the_inputs_at_small_t():
    x_a, x_b = data(4, 0), data(4, 1)
    out = interpolate(make(), oracle, x_a, x_b, [0.0, 0.5, 1.0], 5, generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 3, 1, 8, 8)
    rms = lambda u, v: (u - v).pow(2).mean().sqrt().item()  # noqa: E731
    # Decoding draws x_0' from (nearly) p(x_0 | x_t), independent of x_0 given x_t, so the expected
    # squared error is 2 Var(x_0 | x_t) = 2 s^2 (1 - abar) / (abar s^2 + 1 - abar): rms 0.037 at t=5,
    # with ~5% sampling error over 256 pixels (fixed_large adds a little).
    a = ABAR[5]
    expected = math.sqrt(2 * S**2 * (1 - a) / (a * S**2 + 1 - a))
    print(
        f"t=5 endpoint rms errors: {rms(out[:, 0], x_a):.4f} {rms(out[:, 2], x_b):.4f} (expected {expected:.4f}); "
        f"inputs apart {rms(x_a, x_b):.3f}"
    )
    assert rms(out[:, 0], x_a) == pytest.approx(expected, rel=0.25)
    assert rms(out[:, 2], x_b) == pytest.approx(expected, rel=0.25)
    assert rms(x_a, x_b) > 0.2
    # the middle column is near the pixel-space midpoint at such a small t
    assert rms(out[:, 1], (x_a + x_b) / 2) < 0.06


def test_interpolation_shares_encoding_and_reverse_noise_across_lambdas():
    x = data(2, 3)
    out = interpolate(
        make(),
        oracle,
        x,
        x,
        torch.linspace(0, 1, 5),
        400,
        SamplerOptions(steps=20),
        generator=torch.Generator().manual_seed(0),
    )
    for j in range(1, 5):  # equal inputs: every lambda is the same decode
        torch.testing.assert_close(out[:, j], out[:, 0])
    assert not torch.allclose(out[0, 0], out[1, 0])  # different pairs get different noise


def test_interpolation_with_ddim_decoding_is_the_closed_form():
    """Encode with known noise, blend, decode with DDIM eta=0 from t: image = slope x_bar_t + shift."""
    x_a, x_b = data(2, 4), data(2, 5)
    t, lam = 300, torch.tensor([0.0, 0.3, 1.0], dtype=torch.float64)
    noise = torch.randn(x_a.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    out = interpolate(make(), oracle, x_a, x_b, lam, t, SamplerOptions("ddim", steps=25), noise=noise)
    a = ABAR[t]
    x_t = lambda x: math.sqrt(a) * x + math.sqrt(1 - a) * noise  # noqa: E731
    slope, shift = decoder_map(space_timesteps(t + 1, 25))
    for j, lj in enumerate(lam.tolist()):
        blended = (1 - lj) * x_t(x_a) + lj * x_t(x_b)
        np.testing.assert_allclose(out[:, j].numpy(), (slope * blended + shift).numpy(), atol=1e-9)


def test_interpolation_rejects_bad_arguments():
    x = data(1, 0)
    with pytest.raises(ValueError, match="same shape"):
        interpolate(make(), oracle, x, data(2, 0), [0.5], 10)
    with pytest.raises(ValueError, match="unknown interpolation method"):
        interpolate(make(), oracle, x, x, [0.5], 10, method="cubic")
    with pytest.raises(ValueError, match="lambdas must not be empty"):
        interpolate(make(), oracle, x, x, [], 10)


# --- DDIM inversion ------------------------------------------------------------------------------
@pytest.mark.parametrize("steps", [20, 50])
def test_ddim_invert_is_the_closed_form_encoder(steps):
    x0 = data(4, 7)
    latent = ddim_invert(make(), oracle, x0, SamplerOptions(steps=steps))
    slope, shift = encoder_map(space_timesteps(T, steps))
    np.testing.assert_allclose(latent.numpy(), (slope * x0 + shift).numpy(), atol=1e-9)
    rec_slope, rec_shift = decoder_map(space_timesteps(T, steps))
    recon = ddim_sample(make(), oracle, latent, SamplerOptions(steps=steps))
    np.testing.assert_allclose(recon.numpy(), (rec_slope * latent + rec_shift).numpy(), atol=1e-9)


def test_ddim_inversion_reconstruction_error_shrinks_with_steps():
    """The probability-flow ODE maps N(m, s^2) to N(0, 1) by x_T = sqrt(abar_T) m + sqrt(abar_T s^2 +
    1 - abar_T) (x_0 - m) / s; DDIM's encoder and decoder approach it and each other as steps grow.
    Measured max |x0 - recon| over 256 pixels: 0.0098 (1000 steps), 0.048 (200), 0.18 (50)."""
    x0 = data(4, 8)
    a_T = ABAR[-1]
    exact_latent = math.sqrt(a_T) * M + math.sqrt(a_T * S**2 + 1 - a_T) * (x0 - M) / S
    errors = {}
    for steps, rec_tol, latent_tol in [(1000, 0.02, 0.04), (200, 0.08, 0.2)]:
        latent = ddim_invert(make(), oracle, x0, SamplerOptions(steps=steps))
        recon = ddim_sample(make(), oracle, latent, SamplerOptions(steps=steps))
        errors[steps] = (recon - x0).abs().max().item()
        print(
            f"DDIM {steps} steps: max |x0 - recon| {errors[steps]:.4f}, "
            f"max |latent - exact| {(latent - exact_latent).abs().max().item():.4f}"
        )
        assert errors[steps] < rec_tol
        assert (latent - exact_latent).abs().max().item() < latent_tol
    assert errors[1000] < errors[200] / 3  # first order in the step size


def test_interpolate_ddim_endpoints_reconstruct():
    x_a, x_b = data(2, 9), data(2, 10)
    out = interpolate_ddim(make(), oracle, x_a, x_b, [0.0, 0.5, 1.0], SamplerOptions(steps=100))
    options = SamplerOptions(steps=100)
    recon = ddim_sample(make(), oracle, ddim_invert(make(), oracle, torch.cat([x_a, x_b]), options), options)
    np.testing.assert_allclose(out[:, 0].numpy(), recon[:2].numpy(), atol=1e-9)
    np.testing.assert_allclose(out[:, 2].numpy(), recon[2:].numpy(), atol=1e-9)
    assert (out[:, 0] - x_a).abs().max() < 0.1 and (out[:, 2] - x_b).abs().max() < 0.1
