"""GaussianDiffusion against the closed forms of DDPM (Ho et al. 2020) and improved DDPM (Nichol &
Dhariwal 2021), with every expected value computed here in numpy from the betas."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from src.diffusion import GaussianDiffusion

LN2 = math.log(2.0)


def linear_betas(num_timesteps: int) -> np.ndarray:
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)


def schedule(betas: np.ndarray) -> dict:
    """DDPM quantities for 0-based t (t=0 is the paper's t=1)."""
    alphas = 1.0 - betas
    abar = np.cumprod(alphas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    beta_tilde = betas * (1.0 - abar_prev) / (1.0 - abar)  # eq. 7
    return {
        "betas": betas,
        "abar": abar,
        "abar_prev": abar_prev,
        "beta_tilde": beta_tilde,
        "log_beta_tilde_clipped": np.log(np.concatenate([[beta_tilde[1]], beta_tilde[1:]])),
        "coef1": np.sqrt(abar_prev) * betas / (1.0 - abar),  # eq. 7, coefficient of x_0
        "coef2": np.sqrt(alphas) * (1.0 - abar_prev) / (1.0 - abar),  # eq. 7, coefficient of x_t
    }


def bcast(values: np.ndarray, t: np.ndarray, ndim: int = 4) -> np.ndarray:
    return values[t].reshape(-1, *([1] * (ndim - 1)))


def grid_images(rng, shape) -> np.ndarray:
    """Random images on the 8-bit grid in [-1, 1], including both edges."""
    k = rng.integers(0, 256, size=shape)
    k.flat[0], k.flat[1] = 0, 255
    return k / 127.5 - 1.0


def make(betas: np.ndarray, **kwargs) -> GaussianDiffusion:
    return GaussianDiffusion(torch.from_numpy(betas), **kwargs)


T_VALUES = np.array([0, 1, 2, 7, 25, 48, 49])  # for T = 50: both ends and the middle


# --- forward process ------------------------------------------------------------------------------
def test_q_sample_closed_form():
    rng = np.random.default_rng(0)
    betas = linear_betas(50)
    s = schedule(betas)
    x0, noise = rng.uniform(-1, 1, size=(7, 3, 4, 4)), rng.normal(size=(7, 3, 4, 4))
    got = make(betas).q_sample(torch.from_numpy(x0), torch.from_numpy(T_VALUES), torch.from_numpy(noise))
    expected = np.sqrt(bcast(s["abar"], T_VALUES)) * x0 + np.sqrt(1.0 - bcast(s["abar"], T_VALUES)) * noise
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t_index", [0, 100, 500, 999])
def test_q_sample_statistics(t_index):
    # Many draws of x_t ~ q(x_t | x_0) for one fixed 2x2 image: mean sqrt(abar) x_0, variance 1 - abar.
    torch.manual_seed(t_index)
    s = schedule(linear_betas(1000))
    diffusion = make(linear_betas(1000))
    x0_img = np.array([[[-1.0, -0.2], [0.5, 1.0]]])  # [1, 2, 2]
    n = 40000
    x0 = torch.from_numpy(np.broadcast_to(x0_img, (n, 1, 2, 2)).copy())
    xt = diffusion.q_sample(x0, torch.full((n,), t_index)).numpy()
    abar = s["abar"][t_index]
    mean, var = xt.mean(axis=0), xt.var(axis=0, ddof=1)
    # 5 standard errors: SE(mean) = sqrt(var/n), SE(var) = var sqrt(2/(n-1)) for Gaussian samples.
    np.testing.assert_array_less(np.abs(mean - np.sqrt(abar) * x0_img), 5 * math.sqrt((1 - abar) / n))
    np.testing.assert_array_less(np.abs(var - (1 - abar)), 5 * (1 - abar) * math.sqrt(2 / (n - 1)))


def test_prior_bpd_closed_form():
    rng = np.random.default_rng(1)
    x0 = grid_images(rng, (3, 1, 4, 4))
    short = np.linspace(1e-4, 0.05, 20)  # too little noise: q(x_T | x_0) is far from N(0, I)
    for betas in (linear_betas(1000), short):
        s = schedule(betas)
        a = s["abar"][-1]
        # KL(N(sqrt(a) x0, 1 - a) || N(0, 1)) per pixel, averaged, in bits.
        kl = 0.5 * (-np.log(1 - a) + (1 - a) + a * x0**2 - 1.0)
        expected = kl.reshape(3, -1).mean(axis=1) / LN2
        got = make(betas).prior_bpd(torch.from_numpy(x0)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-15)
    assert (expected > 0.05).all()
    # T=1000 linear leaves ~1e-5 bits/dim.
    assert make(linear_betas(1000)).prior_bpd(torch.from_numpy(x0)).max() < 1e-4


# --- posterior q(x_{t-1} | x_t, x_0) --------------------------------------------------------------
@pytest.mark.parametrize("num_timesteps", [50, 1000])
def test_posterior_matches_eq7(num_timesteps):
    rng = np.random.default_rng(2)
    betas = linear_betas(num_timesteps)
    s = schedule(betas)
    t = np.array([0, 1, 2, num_timesteps // 2, num_timesteps - 1])
    x0, xt = rng.uniform(-1, 1, size=(5, 2, 3, 3)), rng.normal(size=(5, 2, 3, 3))
    mean, var, logvar = make(betas).q_posterior_mean_variance(
        torch.from_numpy(x0), torch.from_numpy(xt), torch.from_numpy(t)
    )
    # mu~_t = sqrt(abar_{t-1}) beta_t / (1 - abar_t) x_0 + sqrt(alpha_t) (1 - abar_{t-1}) / (1 - abar_t) x_t
    abar, abar_prev = bcast(s["abar"], t), bcast(s["abar_prev"], t)
    beta, alpha = bcast(betas, t), 1.0 - bcast(betas, t)
    expected_mean = (np.sqrt(abar_prev) * beta / (1 - abar)) * x0 + (np.sqrt(alpha) * (1 - abar_prev) / (1 - abar)) * xt
    np.testing.assert_allclose(mean.numpy(), expected_mean, rtol=1e-10, atol=1e-12)
    # beta~_t = (1 - abar_{t-1}) / (1 - abar_t) beta_t, which is 0 at t=0 (x_0 is known exactly there).
    expected_var = np.broadcast_to((1 - abar_prev) / (1 - abar) * beta, x0.shape)
    np.testing.assert_allclose(var.numpy(), expected_var, rtol=1e-10, atol=0)
    assert (var.numpy()[0] == 0).all()
    # The log variance is clipped at t=0 to log beta~ of the next step.
    expected_logvar = np.log(np.where(t == 0, s["beta_tilde"][1], s["beta_tilde"][t])).reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(logvar.numpy(), np.broadcast_to(expected_logvar, x0.shape), rtol=1e-10)
    # At t=0 the posterior mean is x_0 itself.
    np.testing.assert_allclose(mean.numpy()[0], x0[0], rtol=1e-12)


# --- reverse-process variances --------------------------------------------------------------------
def constant_model(output: np.ndarray):
    out = torch.from_numpy(output)
    return lambda xt, t: out


def test_fixed_small_and_fixed_large_variances():
    betas = linear_betas(50)
    s = schedule(betas)
    t = torch.from_numpy(T_VALUES)
    xt = torch.zeros(len(T_VALUES), 1, 2, 2, dtype=torch.float64)
    small = make(betas, var_type="fixed_small").p_mean_variance(constant_model(np.zeros(xt.shape)), xt, t)
    np.testing.assert_allclose(small["variance"].numpy()[:, 0, 0, 0], s["beta_tilde"][T_VALUES], rtol=1e-10)
    np.testing.assert_allclose(
        small["log_variance"].numpy()[:, 0, 0, 0], s["log_beta_tilde_clipped"][T_VALUES], rtol=1e-10
    )
    large = make(betas, var_type="fixed_large").p_mean_variance(constant_model(np.zeros(xt.shape)), xt, t)
    # sigma_t^2 = beta_t for t >= 1 and beta~ of the second step at t = 0.
    expected = np.where(T_VALUES == 0, s["beta_tilde"][1], betas[T_VALUES])
    assert expected[0] != betas[0]
    np.testing.assert_allclose(large["variance"].numpy()[:, 0, 0, 0], expected, rtol=1e-10)
    np.testing.assert_allclose(large["log_variance"].numpy()[:, 0, 0, 0], np.log(expected), rtol=1e-10)
    assert large["variance"].shape == xt.shape


@pytest.mark.parametrize("v,frac", [(-1.0, 0.0), (1.0, 1.0), (0.0, 0.5), (0.4, 0.7)])
def test_learned_range_interpolates_log_variance(v, frac):
    betas = linear_betas(50)
    s = schedule(betas)
    n = len(T_VALUES)
    xt = torch.zeros(n, 3, 2, 2, dtype=torch.float64)
    output = np.concatenate([np.zeros((n, 3, 2, 2)), np.full((n, 3, 2, 2), v)], axis=1)
    out = make(betas, var_type="learned_range", loss_type="hybrid").p_mean_variance(
        constant_model(output), xt, torch.from_numpy(T_VALUES)
    )
    # v = -1: log beta~_t (clipped at t=0), v = 1: log beta_t, in between linear in log space.
    expected = frac * np.log(betas[T_VALUES]) + (1 - frac) * s["log_beta_tilde_clipped"][T_VALUES]
    np.testing.assert_allclose(
        out["log_variance"].numpy(), np.broadcast_to(expected.reshape(-1, 1, 1, 1), xt.shape), rtol=1e-10
    )
    np.testing.assert_allclose(out["variance"].numpy(), np.exp(out["log_variance"].numpy()), rtol=1e-12)


def test_learned_range_is_per_pixel():
    betas = linear_betas(50)
    s = schedule(betas)
    v = np.linspace(-1, 1, 8).reshape(1, 2, 2, 2)
    output = np.concatenate([np.zeros((1, 2, 2, 2)), v], axis=1)
    out = make(betas, var_type="learned_range", loss_type="vlb").p_mean_variance(
        constant_model(output), torch.zeros(1, 2, 2, 2, dtype=torch.float64), torch.tensor([10])
    )
    frac = (v + 1) / 2
    expected = frac * np.log(betas[10]) + (1 - frac) * np.log(s["beta_tilde"][10])
    np.testing.assert_allclose(out["log_variance"].numpy(), expected, rtol=1e-10)


# --- parameterisations: feeding the true target recovers x_0 exactly --------------------------------
def true_target_model(mean_type: str, x0: np.ndarray, noise: np.ndarray, s: dict, learned: bool):
    """A model that outputs the exact training target for the x_t it is given."""

    def model(xt, t):
        tt = t.numpy()
        if mean_type == "eps":
            out = noise
        elif mean_type == "x0":
            out = x0
        else:  # the posterior mean of eq. 7 at the true x_0
            out = bcast(s["coef1"], tt) * x0 + bcast(s["coef2"], tt) * xt.numpy()
        if learned:
            out = np.concatenate([out, np.zeros_like(out)], axis=1)
        return torch.from_numpy(np.ascontiguousarray(out))

    return model


@pytest.mark.parametrize("mean_type", ["eps", "x0", "mu"])
@pytest.mark.parametrize("var_type", ["fixed_small", "learned_range"])
def test_true_target_gives_x0_and_zero_mse(mean_type, var_type):
    rng = np.random.default_rng(3)
    betas = linear_betas(50)
    s = schedule(betas)
    x0, noise = grid_images(rng, (len(T_VALUES), 2, 4, 4)), rng.normal(size=(len(T_VALUES), 2, 4, 4))
    t = torch.from_numpy(T_VALUES)
    xt = np.sqrt(bcast(s["abar"], T_VALUES)) * x0 + np.sqrt(1 - bcast(s["abar"], T_VALUES)) * noise
    diffusion = make(
        betas, mean_type=mean_type, var_type=var_type, loss_type="hybrid" if var_type == "learned_range" else "simple"
    )
    model = true_target_model(mean_type, x0, noise, s, learned=var_type == "learned_range")

    out = diffusion.p_mean_variance(model, torch.from_numpy(xt), t, clip_denoised=False)
    np.testing.assert_allclose(out["pred_x0"].numpy(), x0, rtol=1e-8, atol=1e-8)
    np.testing.assert_allclose(out["pred_eps"].numpy(), noise, rtol=1e-6, atol=1e-6)
    post_mean = bcast(s["coef1"], T_VALUES) * x0 + bcast(s["coef2"], T_VALUES) * xt
    np.testing.assert_allclose(out["mean"].numpy(), post_mean, rtol=1e-8, atol=1e-10)

    losses = diffusion.training_losses(model, torch.from_numpy(x0), t, noise=torch.from_numpy(noise))
    assert losses["mse"].shape == (len(T_VALUES),)
    np.testing.assert_allclose(losses["mse"].numpy(), 0.0, atol=1e-16)
    if var_type == "fixed_small":
        # The model's p(x_{t-1} | x_t) is then exactly the posterior: every KL term vanishes.
        np.testing.assert_allclose(losses["vb"].numpy()[T_VALUES > 0], 0.0, atol=1e-10)


def test_clip_denoised_clamps_pred_x0():
    betas = linear_betas(50)
    xt = torch.full((1, 1, 2, 2), 3.0, dtype=torch.float64)
    diffusion = make(betas, mean_type="x0", var_type="fixed_small")
    model = constant_model(np.array([[[[-4.0, -0.5], [0.5, 4.0]]]]))
    clipped = diffusion.p_mean_variance(model, xt, torch.tensor([20]), clip_denoised=True)["pred_x0"]
    raw = diffusion.p_mean_variance(model, xt, torch.tensor([20]), clip_denoised=False)["pred_x0"]
    np.testing.assert_allclose(clipped.numpy().ravel(), [-1.0, -0.5, 0.5, 1.0])
    np.testing.assert_allclose(raw.numpy().ravel(), [-4.0, -0.5, 0.5, 4.0])


# --- the variational bound term and the three losses ----------------------------------------------
def expected_vb_bits(x0, xt, t, model_mean, log_var, s):
    """KL(q(x_{t-1}|x_t,x_0) || N(model_mean, exp(log_var))) for t > 0 and the discretized Gaussian
    decoder NLL at t = 0, both averaged over pixels, in bits [N]."""
    true_mean = bcast(s["coef1"], t) * x0 + bcast(s["coef2"], t) * xt
    true_var = np.exp(bcast(s["log_beta_tilde_clipped"], t))
    var = np.exp(log_var)
    kl = 0.5 * (np.log(var / true_var) + (true_var + (true_mean - model_mean) ** 2) / var - 1.0)
    scale = np.sqrt(var)
    upper = stats.norm.cdf((x0 + 1 / 255 - model_mean) / scale)
    lower = stats.norm.cdf((x0 - 1 / 255 - model_mean) / scale)
    prob = np.where(x0 < -0.999, upper, np.where(x0 > 0.999, 1 - lower, upper - lower))
    nll = -np.log(prob)
    per_pixel = np.where((t == 0).reshape(-1, 1, 1, 1), nll, kl)
    return per_pixel.reshape(len(t), -1).mean(axis=1) / LN2


@pytest.mark.parametrize(
    "var_type,loss_type",
    [
        ("fixed_small", "simple"),
        ("fixed_large", "simple"),
        ("fixed_small", "vlb"),
        ("fixed_large", "hybrid"),
        ("learned_range", "vlb"),
        ("learned_range", "hybrid"),
    ],
)
def test_training_losses_closed_form(var_type, loss_type):
    # An eps-model that is off by delta: everything below follows from eq. 7, 11 and 15.
    rng = np.random.default_rng(4)
    num_timesteps = 50
    betas = linear_betas(num_timesteps)
    s = schedule(betas)
    shape = (len(T_VALUES), 2, 4, 4)
    x0 = np.clip(grid_images(rng, shape) * 0.5, -1, 1)
    x0 = np.round((x0 + 1) * 127.5) / 127.5 - 1  # back onto the 8-bit grid
    noise, delta = rng.normal(size=shape), 0.3 * rng.normal(size=shape)
    v = rng.uniform(-1, 1, size=shape)
    learned = var_type == "learned_range"

    def model(xt, t):
        out = noise + delta
        return torch.from_numpy(np.concatenate([out, v], axis=1) if learned else out)

    diffusion = make(betas, mean_type="eps", var_type=var_type, loss_type=loss_type)
    losses = diffusion.training_losses(
        model, torch.from_numpy(x0), torch.from_numpy(T_VALUES), noise=torch.from_numpy(noise)
    )

    abar = bcast(s["abar"], T_VALUES)
    xt = np.sqrt(abar) * x0 + np.sqrt(1 - abar) * noise
    pred_x0 = (xt - np.sqrt(1 - abar) * (noise + delta)) / np.sqrt(abar)  # eq. 15, unclipped in the loss
    model_mean = bcast(s["coef1"], T_VALUES) * pred_x0 + bcast(s["coef2"], T_VALUES) * xt
    if var_type == "fixed_small":
        log_var = np.broadcast_to(bcast(s["log_beta_tilde_clipped"], T_VALUES), shape)
    elif var_type == "fixed_large":
        log_var = np.broadcast_to(bcast(np.log(np.concatenate([[s["beta_tilde"][1]], betas[1:]])), T_VALUES), shape)
    else:
        frac = (v + 1) / 2
        log_var = frac * bcast(np.log(betas), T_VALUES) + (1 - frac) * bcast(s["log_beta_tilde_clipped"], T_VALUES)

    expected_mse = (delta**2).reshape(len(T_VALUES), -1).mean(axis=1)
    expected_vb = expected_vb_bits(x0, xt, T_VALUES, model_mean, log_var, s)
    np.testing.assert_allclose(losses["mse"].detach().numpy(), expected_mse, rtol=1e-10)
    np.testing.assert_allclose(losses["vb"].detach().numpy(), expected_vb, rtol=1e-7, atol=1e-10)
    assert (expected_vb > 1e-3).all()  # a non-trivial bound term at every t
    expected_loss = {
        "simple": expected_mse,
        "vlb": num_timesteps * expected_vb,  # T E_t[L_t] estimates the whole bound
        "hybrid": expected_mse + (num_timesteps / 1000.0) * expected_vb,  # lambda = 0.001 at T = 1000
    }[loss_type]
    np.testing.assert_allclose(losses["loss"].detach().numpy(), expected_loss, rtol=1e-7)


def test_fixed_small_kl_closed_form_in_delta():
    # For fixed_small and t >= 1 the KL reduces to coef1^2 (1/abar - 1) delta^2 / (2 beta~_t) per pixel.
    rng = np.random.default_rng(5)
    betas = linear_betas(1000)
    s = schedule(betas)
    t = np.array([1, 10, 300, 999])
    x0, noise, delta = rng.uniform(-1, 1, (4, 1, 8, 8)), rng.normal(size=(4, 1, 8, 8)), rng.normal(size=(4, 1, 8, 8))
    losses = make(betas, var_type="fixed_small").training_losses(
        lambda xt, tt: torch.from_numpy(noise + delta),
        torch.from_numpy(x0),
        torch.from_numpy(t),
        noise=torch.from_numpy(noise),
    )
    kl = bcast(s["coef1"][t] ** 2 * (1 / s["abar"][t] - 1) / (2 * s["beta_tilde"][t]), np.arange(4)) * delta**2
    np.testing.assert_allclose(losses["vb"].numpy(), kl.reshape(4, -1).mean(axis=1) / LN2, rtol=1e-7)


def test_hybrid_stops_the_mean_gradient_of_the_vb_term():
    rng = np.random.default_rng(6)
    betas = linear_betas(50)
    shape = (len(T_VALUES), 1, 4, 4)
    x0, noise = grid_images(rng, shape), rng.normal(size=shape)
    mean_leaf = torch.from_numpy(noise + 0.5 * rng.normal(size=shape)).requires_grad_(True)
    v_leaf = torch.from_numpy(rng.uniform(-0.9, 0.9, size=shape)).requires_grad_(True)

    def model(xt, t):
        return torch.cat([mean_leaf, v_leaf], dim=1)

    def grads(loss_type, key):
        diffusion = make(betas, var_type="learned_range", loss_type=loss_type)
        out = diffusion.training_losses(
            model, torch.from_numpy(x0), torch.from_numpy(T_VALUES), noise=torch.from_numpy(noise)
        )
        g_mean, g_v = torch.autograd.grad(out[key].sum(), [mean_leaf, v_leaf], allow_unused=True)
        return (
            torch.zeros(shape, dtype=torch.float64) if g_mean is None else g_mean,
            torch.zeros(shape, dtype=torch.float64) if g_v is None else g_v,
        )

    # hybrid: the vb term trains the variance only ...
    g_mean, g_v = grads("hybrid", "vb")
    assert torch.count_nonzero(g_mean) == 0
    assert (g_v.abs().flatten(1).sum(1) > 0).all()
    # ... so the mean's gradient of the total loss is that of the MSE alone: 2 (eps_hat - eps) / D.
    g_mean_total, _ = grads("hybrid", "loss")
    d = np.prod(shape[1:])
    np.testing.assert_allclose(g_mean_total.numpy(), 2 * (mean_leaf.detach().numpy() - noise) / d, rtol=1e-10)
    # vlb does propagate the bound into the mean (the contrast that makes the above meaningful).
    g_mean_vlb, _ = grads("vlb", "vb")
    assert (g_mean_vlb.abs().flatten(1).sum(1) > 0).all()


def test_simple_loss_vb_is_logged_without_graph():
    betas = linear_betas(50)
    mean_leaf = torch.zeros(2, 1, 2, 2, dtype=torch.float64, requires_grad=True)
    out = make(betas, var_type="fixed_small", loss_type="simple").training_losses(
        lambda xt, t: mean_leaf * 1.0, torch.zeros(2, 1, 2, 2, dtype=torch.float64), torch.tensor([0, 30])
    )
    assert out["loss"].requires_grad and not out["vb"].requires_grad
    assert torch.isfinite(out["vb"]).all()


# --- configuration errors -------------------------------------------------------------------------
def test_simple_loss_with_learned_variance_is_rejected():
    with pytest.raises(ValueError, match="simple"):
        make(linear_betas(50), var_type="learned_range", loss_type="simple")


def test_learned_range_needs_twice_the_channels():
    betas = linear_betas(50)
    diffusion = make(betas, var_type="learned_range", loss_type="hybrid")
    x0 = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    c_model = lambda xt, t: torch.zeros_like(xt)  # noqa: E731 -- C channels instead of 2C
    with pytest.raises(ValueError, match=r"2 \*"):
        diffusion.training_losses(c_model, x0, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"2 \*"):
        diffusion.p_mean_variance(c_model, x0, torch.tensor([1, 2]))
    # And the converse: a fixed variance with 2C channels is an error too.
    with pytest.raises(ValueError, match="channels"):
        make(betas, var_type="fixed_small").training_losses(
            lambda xt, t: torch.cat([xt, xt], 1), x0, torch.tensor([1, 2])
        )


@pytest.mark.parametrize(
    "kwarg,bad,choices",
    [
        ("mean_type", "velocity", ["eps", "x0", "mu", "v"]),
        ("var_type", "learned", ["fixed_small", "fixed_large", "learned_range"]),
        ("loss_type", "kl", ["simple", "vlb", "hybrid"]),
    ],
)
def test_unknown_types_list_choices(kwarg, bad, choices):
    with pytest.raises(ValueError) as excinfo:
        make(linear_betas(50), **{kwarg: bad})
    message = str(excinfo.value)
    assert bad in message and all(choice in message for choice in choices)


CASTS = {
    "half": lambda m: m.half(),
    "bfloat16": lambda m: m.to(torch.bfloat16),
    "float": lambda m: m.float(),
}


@pytest.mark.parametrize("cast", CASTS.values(), ids=CASTS.keys())
def test_schedule_stays_float64_when_module_is_cast(cast):
    betas = linear_betas(1000)
    diffusion = cast(make(betas, var_type="fixed_large"))
    buffers = dict(diffusion.named_buffers())
    assert len(buffers) > 5 and all(b.dtype == torch.float64 for b in buffers.values())
    # The schedule is not part of checkpoints (it is rebuilt from the config).
    assert diffusion.state_dict() == {}
    # Low-precision inputs are computed at least in float32 against the float64 schedule.
    x0 = torch.full((1, 1, 2, 2), 0.5, dtype=torch.float16)
    xt = diffusion.q_sample(x0, torch.tensor([999]), torch.zeros_like(x0))
    assert xt.dtype == torch.float32
    assert xt[0, 0, 0, 0].item() == pytest.approx(0.5 * math.sqrt(np.prod(1.0 - betas)), rel=1e-3)


@pytest.mark.parametrize("cast", CASTS.values(), ids=CASTS.keys())
def test_schedule_values_survive_module_cast(cast):
    betas = linear_betas(1000)
    diffusion = cast(make(betas, var_type="fixed_large"))
    # Only device moves may apply to the schedule: its float64 values are unchanged, bit for bit.
    np.testing.assert_array_equal(diffusion.betas.numpy(), betas)
    np.testing.assert_array_equal(diffusion.alphas_cumprod.numpy(), np.cumprod(1.0 - betas))
    reference = make(betas, var_type="fixed_large")
    for name, buf in reference.named_buffers():
        np.testing.assert_array_equal(getattr(diffusion, name).numpy(), buf.numpy(), err_msg=name)
