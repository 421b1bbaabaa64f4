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


@pytest.mark.parametrize(
    "loss_type,var_type", [("simple", "fixed_large"), ("hybrid", "learned_range"), ("vlb", "learned_range")]
)
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
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4 * 1000 / T,
        beta_end=0.02 * 1000 / T,
        prediction_type="v_prediction",
        variance_type="fixed_small",
        clip_sample=True,
    )
    diff = GaussianDiffusion(torch.from_numpy(linear_betas(T)), mean_type="v", var_type="fixed_small")
    t = torch.from_numpy(TS)
    np.testing.assert_allclose(diff.v_target(x0, t, eps).numpy(), scheduler.get_velocity(x0, eps, t).numpy(), atol=1e-5)
    xt = diff.q_sample(x0, t, eps)
    v_out = 0.7 * eps - 0.4 * x0 + 0.1  # any network output
    for i, step in enumerate(TS.tolist()):
        generator = torch.Generator().manual_seed(i)
        theirs = scheduler.step(v_out[i : i + 1], step, xt[i : i + 1], generator=generator)
        noise = torch.randn(v_out[i : i + 1].shape, generator=torch.Generator().manual_seed(i))
        ours = diff.p_sample(constant_model(v_out[i : i + 1]), xt[i : i + 1], t[i : i + 1], noise, clip_denoised=True)
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
            return torch.where(
                (y == self.num_classes).view(-1, 1, 1, 1), torch.cat([v_null, v_null]), torch.cat([v_cond, v_cond])
            )

    guided = ClassifierFreeGuidance(TwoPass(), w)(xt, t, y=torch.zeros(len(TS), dtype=torch.long))
    eps_cond, eps_null = diff.predict_eps_from_v(xt, t, v_cond), diff.predict_eps_from_v(xt, t, v_null)
    np.testing.assert_allclose(
        diff.predict_eps_from_v(xt, t, guided).numpy(), ((1 + w) * eps_cond - w * eps_null).numpy(), atol=1e-10
    )


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


# --- loss weighting ---------------------------------------------------------------------------------
def snr_of(betas: np.ndarray) -> np.ndarray:
    abar = np.cumprod(1.0 - betas)
    return abar / (1.0 - abar)


@pytest.mark.parametrize(
    "mean_type,expected",
    [
        ("eps", lambda snr, g: np.minimum(snr, g) / snr),
        ("x0", lambda snr, g: np.minimum(snr, g)),
        ("v", lambda snr, g: np.minimum(snr, g) / (snr + 1.0)),  # not min(SNR + 1, g) / (SNR + 1)
    ],
)
def test_min_snr_weights_closed_form(mean_type, expected):
    betas = linear_betas(1000)
    diff = GaussianDiffusion(torch.from_numpy(betas), mean_type=mean_type, loss_weighting="min_snr", min_snr_gamma=5)
    np.testing.assert_allclose(diff.loss_weights.numpy(), expected(snr_of(betas), 5.0), rtol=1e-12)


@pytest.mark.parametrize(
    "mean_type,to_target", [("eps", lambda snr: 1.0), ("x0", lambda snr: snr), ("v", lambda snr: snr / (snr + 1.0))]
)
def test_p2_weights_closed_form(mean_type, to_target):
    """1 / (k + SNR)^gamma on the eps MSE; the x0 and v MSEs are SNR and SNR / (SNR + 1) times smaller."""
    betas = linear_betas(1000)
    diff = GaussianDiffusion(torch.from_numpy(betas), mean_type=mean_type, loss_weighting="p2", p2_gamma=0.5, p2_k=2.0)
    snr = snr_of(betas)
    np.testing.assert_allclose(diff.loss_weights.numpy(), to_target(snr) / (2.0 + snr) ** 0.5, rtol=1e-12)


@pytest.mark.parametrize("loss_type,var_type", [("simple", "fixed_large"), ("hybrid", "learned_range")])
def test_weighting_scales_the_mse_term_only(data, loss_type, var_type):
    x0, eps = (torch.from_numpy(a) for a in data)
    betas = linear_betas(T)
    t = torch.from_numpy(TS)
    output = torch.randn(
        x0.shape[0], x0.shape[1] * (2 if var_type == "learned_range" else 1), *x0.shape[2:], dtype=torch.float64
    )
    plain, weighted = (
        GaussianDiffusion(
            torch.from_numpy(betas), mean_type="v", var_type=var_type, loss_type=loss_type, loss_weighting=w
        )
        for w in ("none", "min_snr")
    )
    a = plain.training_losses(constant_model(output), x0, t, noise=eps)
    b = weighted.training_losses(constant_model(output), x0, t, noise=eps)
    snr = snr_of(betas)[TS]
    w = np.minimum(snr, 5.0) / (snr + 1.0)
    vb_part = (a["loss"] - a["mse"]).numpy()
    np.testing.assert_allclose(b["loss"].numpy(), w * a["mse"].numpy() + vb_part, rtol=1e-10)
    np.testing.assert_allclose(b["mse"].numpy(), a["mse"].numpy())  # logged unweighted


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"mean_type": "mu", "loss_weighting": "min_snr"}, r"eps, x0 or v, not 'mu'"),
        ({"loss_type": "vlb", "var_type": "learned_range", "loss_weighting": "p2"}, r"loss_type='simple' or 'hybrid'"),
        ({"loss_weighting": "snr"}, r"choose one of none, min_snr, p2"),
        ({"loss_weighting": "p2", "p2_k": 0.0}, r"p2_k > 0"),
    ],
)
def test_bad_weighting_is_one_line(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GaussianDiffusion(torch.from_numpy(linear_betas(T)), **kwargs)


# --- zero terminal SNR ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_zero_terminal_snr_matches_diffusers(name):
    from diffusers.schedulers.scheduling_ddim import rescale_zero_terminal_snr

    from src.diffusion import make_beta_schedule

    betas = make_beta_schedule(name, 1000)
    rescaled = make_beta_schedule(name, 1000, zero_terminal_snr=True)
    abar, abar_zero = (GaussianDiffusion(b, mean_type="v").alphas_cumprod for b in (betas, rescaled))
    assert abar_zero[-1].item() == 0.0 and rescaled[-1].item() == 1.0
    assert abar_zero[0].item() == pytest.approx(abar[0].item(), rel=1e-14)
    np.testing.assert_allclose(
        rescaled.numpy(), rescale_zero_terminal_snr(betas.clone()).numpy(), rtol=1e-10, atol=1e-15
    )


def ztsnr_diffusion(mean_type="v", num_timesteps=T, name="linear", **kwargs) -> GaussianDiffusion:
    from src.diffusion import make_beta_schedule

    return GaussianDiffusion(
        make_beta_schedule(name, num_timesteps, zero_terminal_snr=True), mean_type=mean_type, **kwargs
    )


def test_zero_terminal_snr_refuses_eps_and_mu_naming_the_fix():
    for mean_type in ("eps", "mu"):
        with pytest.raises(ValueError, match=r"use mean_type='v' or 'x0'"):
            ztsnr_diffusion(mean_type)


def test_zero_terminal_snr_config_error_names_the_fix(compose_train):
    from src.builders import build_diffusion
    from src.errors import ConfigError

    with pytest.raises(ConfigError, match=r"zero_terminal_snr=true .*use objective=v_simple"):
        build_diffusion(compose_train("schedule.zero_terminal_snr=true"))
    diff = build_diffusion(compose_train("schedule.zero_terminal_snr=true", "objective=v_simple"))
    assert diff.alphas_cumprod[-1].item() == 0.0


@pytest.mark.parametrize("mean_type,weighting", [("v", "min_snr"), ("v", "p2"), ("x0", "min_snr"), ("x0", "p2")])
def test_weights_are_finite_at_zero_snr(mean_type, weighting):
    diff = ztsnr_diffusion(mean_type, loss_weighting=weighting)
    assert bool(torch.isfinite(diff.loss_weights).all()) and diff.loss_weights[-1].item() == 0.0


def test_bound_is_finite_at_zero_terminal_snr(data):
    """The prior term is 0 (q(x_T | x_0) is N(0, I)) and every term of the bound is finite."""
    x0 = torch.from_numpy(np.round((data[0][:2] + 1) * 127.5) / 127.5 - 1.0)
    diff = ztsnr_diffusion("v", num_timesteps=10, name="cosine", var_type="learned_range", loss_type="hybrid")
    np.testing.assert_allclose(diff.prior_bpd(x0).numpy(), 0.0, atol=1e-12)
    out = diff.calc_bpd_loop(lambda xt, t: torch.cat([0.1 * xt, torch.zeros_like(xt)], 1), x0)
    for key in ("total_bpd", "vb", "xstart_mse", "mse"):
        assert bool(torch.isfinite(out[key]).all()), key
    losses = diff.training_losses(
        lambda xt, t: torch.cat([0.1 * xt, torch.zeros_like(xt)], 1), x0, torch.tensor([9, 9])
    )
    assert bool(torch.isfinite(losses["loss"]).all())


def test_last_step_at_zero_terminal_snr_matches_diffusers(data):
    """At abar_T = 0 the predicted x_0 of v is -v; one step against DDPMScheduler(rescale_betas_zero_snr=True)."""
    x0, eps = (torch.from_numpy(a[:2]).float() for a in data)
    scheduler = diffusers.DDPMScheduler(
        num_train_timesteps=T,
        beta_start=1e-4 * 1000 / T,
        beta_end=0.02 * 1000 / T,
        prediction_type="v_prediction",
        variance_type="fixed_small",
        rescale_betas_zero_snr=True,
        clip_sample=False,
    )
    diff = ztsnr_diffusion("v", var_type="fixed_small")
    xt, v_out = eps, 0.5 * eps - 0.3 * x0
    theirs = scheduler.step(v_out, T - 1, xt, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(xt.shape, generator=torch.Generator().manual_seed(0))
    ours = diff.p_sample(constant_model(v_out), xt, torch.full((2,), T - 1), noise, clip_denoised=False)
    np.testing.assert_allclose(ours["pred_x0"].numpy(), -v_out.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours["pred_x0"].numpy(), theirs.pred_original_sample.numpy(), atol=1e-5)
    np.testing.assert_allclose(ours["sample"].numpy(), theirs.prev_sample.numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "options",
    [
        dict(sampler="ddpm"),
        dict(sampler="ddpm", steps=5),
        dict(sampler="ddim", spacing="trailing5"),
        dict(sampler="ddim", steps=4, eta=1.0),
    ],
)
def test_sampling_at_zero_terminal_snr_with_v(options):
    from src.diffusion import SamplerOptions, sample

    diff = ztsnr_diffusion("v")
    images = sample(
        diff,
        lambda xt, t: 0.5 * xt,
        (2, 1, 4, 4),
        SamplerOptions(**options),
        generator=torch.Generator().manual_seed(0),
    )
    assert bool(torch.isfinite(images).all())


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "unipc", "euler", "heun"])
def test_solvers_refuse_zero_terminal_snr_naming_the_samplers_that_work(sampler):
    from src.diffusion import SamplerOptions, sample

    with pytest.raises(ValueError, match=r"zero terminal SNR\); use sampler=ddpm or sampler=ddim$"):
        sample(ztsnr_diffusion("v"), lambda xt, t: xt, (1, 1, 4, 4), SamplerOptions(sampler, steps=5))


def test_old_run_configs_without_the_new_keys_still_load_and_resume(compose_train, tmp_path):
    from omegaconf import OmegaConf

    from src.builders import build_diffusion
    from src.checkpoints import upgraded
    from src.errors import ConfigError
    from src.training import check_resume_compatible

    cfg = compose_train("objective=simple")  # runs written before the weighting keys were all plain L_simple
    old = OmegaConf.to_container(cfg, resolve=True)
    for key in ("loss_weighting", "min_snr_gamma", "p2_gamma", "p2_k"):
        del old["objective"][key], old["diffusion"][key]
    del old["schedule"]["zero_terminal_snr"], old["diffusion"]["betas"]["zero_terminal_snr"]
    del old["model"]["patch_size"]
    with pytest.raises(ConfigError, match=r"objective.loss_weighting.*model.patch_size"):
        check_resume_compatible(old, cfg, tmp_path / "last.ckpt")
    check_resume_compatible(upgraded(old), cfg, tmp_path / "last.ckpt")
    diff = build_diffusion(OmegaConf.create(upgraded(old)))
    assert diff.loss_weighting == "none" and diff.alphas_cumprod[-1].item() > 0
    assert upgraded(old)["model"]["patch_size"] == 1
    classifier = {"model": {"_target_": "src.models.NoisyClassifier", "base_channels": 32}}
    assert upgraded(classifier)["model"]["patch_size"] == 1
    other = {"model": {"_target_": "my_package.MyNet", "base_channels": 32}}
    assert "patch_size" not in upgraded(other)["model"]


# --- thresholding -----------------------------------------------------------------------------------
def test_dynamic_threshold_matches_diffusers():
    """Imagen's dynamic thresholding against DDPMScheduler._threshold_sample (s unbounded above: sample_max_value
    large; with sample_max_value=1 diffusers clamps s to 1, i.e. clipping, which is threshold=clip)."""
    from src.diffusion import Threshold

    x0 = torch.randn(4, 3, 8, 8) * torch.tensor([0.3, 1.0, 2.0, 5.0]).view(-1, 1, 1, 1)
    for p in (0.995, 0.9):
        scheduler = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=p, sample_max_value=1e6)
        np.testing.assert_allclose(
            Threshold("dynamic", p)(x0).numpy(), scheduler._threshold_sample(x0).numpy(), atol=1e-6
        )
    clipping = diffusers.DDPMScheduler(thresholding=True, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
    np.testing.assert_allclose(Threshold("clip")(x0).numpy(), clipping._threshold_sample(x0).numpy(), atol=1e-6)
    assert torch.equal(Threshold("dynamic")(x0[:1]), x0[:1])  # within [-1, 1]: s = 1 and nothing changes


def test_dynamic_threshold_closed_form():
    from src.diffusion import Threshold

    x0 = torch.linspace(-4.0, 2.0, 1001).view(1, 1, 7, 143)
    s = float(np.quantile(np.abs(x0.numpy()), 0.995))
    np.testing.assert_allclose(Threshold("dynamic")(x0).numpy(), np.clip(x0.numpy(), -s, s) / s, atol=1e-6)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "euler"])
def test_every_sampler_applies_the_threshold_to_its_x0(sampler):
    """The recorded pred_x0 of a run is the network's x0 prediction thresholded: within [-1, 1] with dynamic
    thresholding (rescaled, so not simply clipped), and untouched with none."""
    from src.diffusion import SamplerOptions, sample_trajectory

    diff = GaussianDiffusion(torch.from_numpy(linear_betas(T)), mean_type="x0")
    model = lambda xt, t: 3.0 * torch.ones_like(xt) + torch.linspace(0, 1, xt[0].numel()).view(xt[0].shape)
    runs = {
        kind: sample_trajectory(
            diff,
            model,
            (1, 1, 4, 4),
            SamplerOptions(sampler, steps=4, threshold=kind),
            generator=torch.Generator().manual_seed(0),
        ).pred_x0
        for kind in ("none", "clip", "dynamic")
    }
    raw = model(torch.zeros(1, 1, 4, 4), None)
    assert torch.allclose(runs["none"][0, 0], raw)
    assert torch.allclose(runs["clip"][0, 0], raw.clamp(-1, 1))
    s = torch.quantile(raw.flatten(), 0.995)
    assert torch.allclose(runs["dynamic"][0, 0], raw.clamp(-s, s) / s)


def test_threshold_options():
    from src.diffusion import SamplerOptions

    assert SamplerOptions().thresholding.kind == "clip"
    assert SamplerOptions(clip_denoised=False).thresholding.kind == "none"
    assert SamplerOptions(threshold="dynamic", threshold_percentile=0.9).thresholding.percentile == 0.9
    with pytest.raises(ValueError, match=r"clip_denoised=false contradicts threshold=dynamic"):
        SamplerOptions(clip_denoised=False, threshold="dynamic")
    with pytest.raises(ValueError, match=r"unknown threshold 'imagen'; choose one of none, clip, dynamic"):
        SamplerOptions(threshold="imagen")
    with pytest.raises(ValueError, match=r"threshold_percentile must be a number in \(0, 1\]"):
        SamplerOptions(threshold="dynamic", threshold_percentile=99.5)


def test_threshold_recorded_only_when_set():
    from src.diffusion import SamplerOptions

    assert "threshold" not in SamplerOptions("ddim").as_dict()
    recorded = SamplerOptions("ddim", threshold="dynamic").as_dict()
    assert (recorded["threshold"], recorded["threshold_percentile"]) == ("dynamic", 0.995)


def test_threshold_from_the_command_line_reaches_the_options(compose_train, compose_sample):
    from omegaconf import OmegaConf

    from src.sampling.loading import sampler_options

    trained = OmegaConf.create(OmegaConf.to_container(compose_train(), resolve=True))
    options = sampler_options(trained, compose_sample("threshold=dynamic", "threshold_percentile=0.99"))
    assert (options.thresholding.kind, options.thresholding.percentile) == ("dynamic", 0.99)
    assert sampler_options(trained, compose_sample()).thresholding.kind == "clip"
