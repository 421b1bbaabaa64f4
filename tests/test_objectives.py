"""Objectives after DDPM against their closed forms and diffusers' schedulers: v-prediction (Salimans & Ho
2022), per-timestep loss weighting (min-SNR-gamma, Hang et al. 2023; P2, Choi et al. 2022), zero terminal SNR
(Lin et al. 2024) and thresholding of the predicted x_0 (Imagen's dynamic thresholding, Saharia et al. 2022).
Expected values are computed here in numpy from the betas, or by diffusers."""
import numpy as np
import pytest
import torch

from src.diffusion import GaussianDiffusion
from src.diffusion.guidance import ClassifierFreeGuidance

diffusers = pytest.importorskip("diffusers")


def linear_betas(num_timesteps: int) -> np.ndarray:
    scale = 1000.0 / num_timesteps
    return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps)


def alpha_sigma(betas: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), shaped [N, 1, 1, 1]."""
    abar = np.cumprod(1.0 - betas)[t].reshape(-1, 1, 1, 1)
    return np.sqrt(abar), np.sqrt(1.0 - abar)


def constant_model(output: torch.Tensor):
    return lambda xt, t, **kwargs: output


T = 50
TS = np.array([0, 1, 13, 25, 48, 49])


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    shape = (len(TS), 2, 3, 3)
    return rng.uniform(-1, 1, size=shape), rng.normal(size=shape)


# --- v-prediction ---------------------------------------------------------------------------------
def test_v_target_is_alpha_eps_minus_sigma_x0(data):
    x0, eps = data
    betas = linear_betas(T)
    alpha, sigma = alpha_sigma(betas, TS)
    diff = GaussianDiffusion(torch.from_numpy(betas), mean_type="v")
    v = diff.v_target(torch.from_numpy(x0), torch.from_numpy(TS), torch.from_numpy(eps))
    np.testing.assert_allclose(v.numpy(), alpha * eps - sigma * x0, rtol=1e-12, atol=1e-12)


def test_v_converts_back_to_x0_and_eps(data):
    x0, eps = data
    betas = linear_betas(T)
    alpha, sigma = alpha_sigma(betas, TS)
    diff = GaussianDiffusion(torch.from_numpy(betas), mean_type="v")
    xt, v = torch.from_numpy(alpha * x0 + sigma * eps), torch.from_numpy(alpha * eps - sigma * x0)
    t = torch.from_numpy(TS)
    np.testing.assert_allclose(diff.predict_x0_from_v(xt, t, v).numpy(), x0, atol=1e-12)
    np.testing.assert_allclose(diff.predict_eps_from_v(xt, t, v).numpy(), eps, atol=1e-12)


def test_oracle_v_model_predicts_x0_and_the_true_posterior(data):
    """A network that returns the true v gives pred_x0 = x0, pred_eps = eps and the mean of q(x_{t-1}|x_t,x_0)."""
    x0, eps = data
    betas = linear_betas(T)
    alpha, sigma = alpha_sigma(betas, TS)
    diff = GaussianDiffusion(torch.from_numpy(betas), mean_type="v", var_type="fixed_small")
    xt, t = torch.from_numpy(alpha * x0 + sigma * eps), torch.from_numpy(TS)
    out = diff.p_mean_variance(constant_model(torch.from_numpy(alpha * eps - sigma * x0)), xt, t, clip_denoised=False)
    np.testing.assert_allclose(out["pred_x0"].numpy(), x0, atol=1e-10)
    np.testing.assert_allclose(out["pred_eps"].numpy(), eps, atol=1e-8)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    c1 = (np.sqrt(abar_prev) * betas / (1.0 - abar))[TS].reshape(-1, 1, 1, 1)
    c2 = (np.sqrt(1.0 - betas) * (1.0 - abar_prev) / (1.0 - abar))[TS].reshape(-1, 1, 1, 1)
    np.testing.assert_allclose(out["mean"].numpy(), c1 * x0 + c2 * xt.numpy(), atol=1e-10)


@pytest.mark.parametrize("loss_type,var_type", [("simple", "fixed_large"), ("hybrid", "learned_range"),
                                                ("vlb", "learned_range")])
def test_v_training_loss_is_zero_for_the_true_v(data, loss_type, var_type):
    """The simple part is ||v - v_theta||^2 (zero at the true v, 1 per pixel when it is off by 1); the vb term of an
    oracle v with the posterior variance is the decoder NLL at t = 0 and 0 (KL of equal Gaussians) elsewhere."""
    x0, eps = data
    betas = linear_betas(T)
    alpha, sigma = alpha_sigma(betas, TS)
    diff = GaussianDiffusion(torch.from_numpy(betas), mean_type="v", var_type=var_type, loss_type=loss_type)
    v = torch.from_numpy(alpha * eps - sigma * x0)
    # learned_range with v = -1 is the posterior variance beta~_t
    extra = [-torch.ones_like(v)] if var_type == "learned_range" else []
    t, x0_t, eps_t = torch.from_numpy(TS), torch.from_numpy(x0), torch.from_numpy(eps)
    exact = diff.training_losses(constant_model(torch.cat([v, *extra], 1)), x0_t, t, noise=eps_t)
    off = diff.training_losses(constant_model(torch.cat([v + 1.0, *extra], 1)), x0_t, t, noise=eps_t)
    np.testing.assert_allclose(exact["mse"].numpy(), 0.0, atol=1e-20)
    np.testing.assert_allclose(off["mse"].numpy(), 1.0, atol=1e-12)
    if var_type == "learned_range":
        np.testing.assert_allclose(exact["vb"].numpy()[1:], 0.0, atol=1e-8)


def test_v_step_matches_diffusers_ddpm_scheduler(data):
    """get_velocity and one ancestral step (pred_x0, x_{t-1} with the same noise) against DDPMScheduler's v_prediction."""
    x0, eps = (torch.from_numpy(a).float() for a in data)
    scheduler = diffusers.DDPMScheduler(num_train_timesteps=T, beta_start=1e-4 * 1000 / T, beta_end=0.02 * 1000 / T,
                                        prediction_type="v_prediction", variance_type="fixed_small", clip_sample=True)
    diff = GaussianDiffusion(torch.from_numpy(linear_betas(T)), mean_type="v", var_type="fixed_small")
    t = torch.from_numpy(TS)
    np.testing.assert_allclose(diff.v_target(x0, t, eps).numpy(),
                               scheduler.get_velocity(x0, eps, t).numpy(), atol=1e-5)
    xt = diff.q_sample(x0, t, eps)
    v_out = 0.7 * eps - 0.4 * x0 + 0.1  # any network output
    for i, step in enumerate(TS.tolist()):
        generator = torch.Generator().manual_seed(i)
        theirs = scheduler.step(v_out[i:i + 1], step, xt[i:i + 1], generator=generator)
        noise = torch.randn(v_out[i:i + 1].shape, generator=torch.Generator().manual_seed(i))
        ours = diff.p_sample(constant_model(v_out[i:i + 1]), xt[i:i + 1], t[i:i + 1], noise, clip_denoised=True)
        np.testing.assert_allclose(ours["pred_x0"].numpy(), theirs.pred_original_sample.numpy(), atol=1e-5)
        np.testing.assert_allclose(ours["sample"].numpy(), theirs.prev_sample.numpy(), atol=1e-5)


def test_classifier_free_guidance_on_v_is_guidance_on_eps(data):
    """The guided v, converted to eps, equals (1 + w) eps(x_t, y) - w eps(x_t) of the two passes' eps."""
    x0, eps = (torch.from_numpy(a) for a in data)
    diff = GaussianDiffusion(torch.from_numpy(linear_betas(T)), mean_type="v")
    t, w = torch.from_numpy(TS), 3.0
    xt = diff.q_sample(x0, t, eps)
    v_cond, v_null = torch.randn_like(xt), torch.randn_like(xt)

    class TwoPass:
        num_classes = 10

        def __call__(self, x, t, y):
            return torch.where((y == self.num_classes).view(-1, 1, 1, 1), torch.cat([v_null, v_null]),
                               torch.cat([v_cond, v_cond]))

    guided = ClassifierFreeGuidance(TwoPass(), w)(xt, t, y=torch.zeros(len(TS), dtype=torch.long))
    eps_cond, eps_null = diff.predict_eps_from_v(xt, t, v_cond), diff.predict_eps_from_v(xt, t, v_null)
    np.testing.assert_allclose(diff.predict_eps_from_v(xt, t, guided).numpy(),
                               ((1 + w) * eps_cond - w * eps_null).numpy(), atol=1e-10)


def test_solver_data_prediction_of_v_is_alpha_x_minus_sigma_v(data):
    """The solvers' x_theta of a v network at a level between training steps: alpha x - sigma v (the level's own
    alpha and sigma), so an oracle v gives back x0."""
    from src.diffusion.solvers import SolverSchedule

    x0, eps = (torch.from_numpy(a[:1]) for a in data)
    diff = GaussianDiffusion(torch.from_numpy(linear_betas(T)), mean_type="v")
    schedule = SolverSchedule(diff, [3.5, 20.25])
    for level in schedule.levels:
        x = level.alpha * x0 + level.sigma * eps
        oracle = constant_model(level.alpha * eps - level.sigma * x0)
        out = schedule.denoise(oracle, x, level, clip_denoised=False, model_kwargs=None, cond_fn=None)
        np.testing.assert_allclose(out["pred_x0"].numpy(), x0.numpy(), atol=1e-10)
        np.testing.assert_allclose(out["pred_eps"].numpy(), eps.numpy(), atol=1e-8)
