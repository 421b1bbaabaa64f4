"""Conditional sampling, classifier-free guidance and classifier guidance against a two-class Gaussian
mixture, where the optimal networks are known in closed form.

Data: y in {0, 1} with equal probability, x_0 | y ~ N(m_y, s^2 I) (every pixel). Then
    x_t | y ~ N(sqrt(abar_t) m_y, v_t I),  v_t = abar_t s^2 + 1 - abar_t,
    eps*(x_t, t, y) = sqrt(1 - abar_t) (x_t - sqrt(abar_t) m_y) / v_t,
    eps*(x_t, t, null) = sum_k p(k | x_t) eps*(x_t, t, k)       (the mixture's score),
    log p(y | x_t) = log softmax_k(-|x_t - sqrt(abar_t) m_k|^2 / (2 v_t))[y].
"""

import math

import numpy as np
import pytest
import torch

from src.diffusion import GaussianDiffusion, Guidance, SamplerOptions, make_beta_schedule, respaced, sample
from src.diffusion.guidance import ClassifierFreeGuidance, classifier_guidance, drop_labels, guide
from src.diffusion.reverse_process import denoise_from, sample_trajectory

T = 1000
MEANS = (-0.2, 0.2)
S = 0.2
SHAPE = (1, 2, 2)  # 4 pixels per image
N = 1000  # images per class
NULL = 2


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def diffusion():
    return GaussianDiffusion(make_beta_schedule("linear", T), var_type="fixed_small")


def _stats(abar_t: torch.Tensor, x: torch.Tensor):
    a = abar_t.to(x.dtype).view(-1, 1, 1, 1)
    v = a * S**2 + 1.0 - a
    m = torch.tensor(MEANS, dtype=x.dtype)
    diff = x[:, None] - a.sqrt()[:, None] * m.view(1, -1, 1, 1, 1)  # [N, K, C, H, W]
    return a, v, diff


class MixtureOracle:
    """eps* of the mixture: a class-conditional "network" with num_classes=2 (label 2 = null)."""

    num_classes = 2

    def __init__(self, abar: torch.Tensor):
        self.abar, self.calls = abar, []

    def __call__(self, x, t, y=None):
        self.calls.append(x.shape[0])
        a, v, diff = _stats(self.abar[t], x)
        eps_k = (1.0 - a).sqrt()[:, None] * diff / v[:, None]  # [N, K, ...]
        post = true_logits(self.abar, x, t).softmax(dim=1).view(-1, 2, 1, 1, 1)
        eps_null = (post * eps_k).sum(dim=1)
        if y is None:
            return eps_null
        picked = eps_k[torch.arange(len(y)), y.clamp(max=1)]
        return torch.where((y == NULL).view(-1, 1, 1, 1), eps_null, picked)


def true_logits(abar: torch.Tensor, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """log p(k | x_t) up to a constant per image: [N, 2]."""
    _, v, diff = _stats(abar[t], x)
    return -(diff**2).flatten(2).sum(-1) / (2.0 * v.view(-1, 1))


def draw(
    diffusion, model, y, seed=0, shape=None, guidance_scale=0.0, classifier=None, classifier_scale=1.0, **options
) -> torch.Tensor:
    guidance = Guidance(y=y, scale=guidance_scale, classifier=classifier, classifier_scale=classifier_scale)
    return sample(
        diffusion,
        model,
        shape or (len(y), *SHAPE),
        SamplerOptions(clip_denoised=False, **options),
        guidance,
        generator=torch.Generator().manual_seed(seed),
    ).double()


def labels() -> torch.Tensor:
    return torch.cat([torch.zeros(N, dtype=torch.long), torch.ones(N, dtype=torch.long)])


def class_moments(abar_all: np.ndarray, kept: list[int], sampler: str, m: float) -> tuple[float, float]:
    """Mean and std of what the sampler draws with the exact eps of N(m, s^2) data: every step is affine
    in x_t, x_{k-1} = A x_k + B + sigma z, so the moments propagate exactly from x_T ~ N(0, 1)."""
    a_all = abar_all[kept]
    mean, var = 0.0, 1.0
    for k in range(len(kept) - 1, -1, -1):
        a, a_prev = a_all[k], (a_all[k - 1] if k else 1.0)
        gain = S**2 * np.sqrt(a) / (a * S**2 + 1 - a)  # E[x_0 | x_t] = gain x_t + offset
        offset = m * (1 - gain * np.sqrt(a))
        if sampler == "ddpm":  # posterior mean at E[x_0 | x_t], fixed_small variance beta~
            beta = 1 - a / a_prev
            c1, c2 = beta * np.sqrt(a_prev) / (1 - a), np.sqrt(1 - beta) * (1 - a_prev) / (1 - a)
            slope, shift, sigma2 = c1 * gain + c2, c1 * offset, beta * (1 - a_prev) / (1 - a)
        else:  # DDIM eta=0: sqrt(a_prev) x0_hat + sqrt(1 - a_prev) eps_hat
            d = np.sqrt(1 - a_prev) / np.sqrt(1 - a)
            slope = np.sqrt(a_prev) * gain + d * (1 - np.sqrt(a) * gain)
            shift, sigma2 = (np.sqrt(a_prev) - d * np.sqrt(a)) * offset, 0.0
        mean, var = slope * mean + shift, slope**2 * var + (sigma2 if k else 0.0)
    return mean, math.sqrt(var)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 50)])
def test_conditional_sampling_hits_the_class_means(diffusion, sampler, steps):
    x = draw(diffusion, MixtureOracle(diffusion.alphas_cumprod), labels(), sampler=sampler, steps=steps)
    kept = respaced(diffusion, steps).timestep_map.tolist()
    for k, m in enumerate(MEANS):
        images = x[k * N : (k + 1) * N]
        mean, std = class_moments(diffusion.alphas_cumprod.numpy(), kept, sampler, m)
        assert mean == pytest.approx(m, abs=1e-3)  # the closed form hits the class mean
        # 4000 pixels: standard errors ~ std / sqrt(4000) (mean) and std / sqrt(8000) (std)
        assert images.mean().item() == pytest.approx(mean, abs=5 * std / math.sqrt(4 * N))
        assert images.std().item() == pytest.approx(std, abs=5 * std / math.sqrt(8 * N))


def test_unconditional_samples_of_the_conditional_model_are_the_mixture(diffusion):
    x = draw(diffusion, MixtureOracle(diffusion.alphas_cumprod), None, steps=100, shape=(2 * N, *SHAPE))
    nearest_one = (x.flatten(1).mean(1) > 0).double().mean().item()
    assert nearest_one == pytest.approx(0.5, abs=4 * math.sqrt(0.25 / (2 * N)))


def test_guided_eps_is_the_closed_form_in_one_batched_call(diffusion):
    """(1 + w) eps(y) - w eps(null) from one network call on 2N images; a learned-variance half is the
    conditional one."""
    oracle = MixtureOracle(diffusion.alphas_cumprod)
    x = torch.randn(6, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([10, 200, 400, 600, 800, 999])
    y = torch.tensor([0, 1, 0, 1, 1, 0])
    w = 2.5
    # numpy closed form, independent of the oracle's torch code
    a = diffusion.alphas_cumprod[t].numpy()[:, None]
    xs = x.flatten(1).numpy()
    v = a * S**2 + 1 - a
    d = [xs - np.sqrt(a) * m for m in MEANS]
    eps = [np.sqrt(1 - a) * dk / v for dk in d]
    logit = np.stack([-(dk**2).sum(1) / (2 * v[:, 0]) for dk in d], 1)
    post = np.exp(logit - logit.max(1, keepdims=True))
    post /= post.sum(1, keepdims=True)
    eps_null = post[:, :1] * eps[0] + post[:, 1:] * eps[1]
    eps_y = np.where(y.numpy()[:, None] == 0, eps[0], eps[1])
    expected = (1 + w) * eps_y - w * eps_null

    guided = ClassifierFreeGuidance(oracle, w)
    got = guided(x, t, y=y)
    assert oracle.calls == [12]
    np.testing.assert_allclose(got.flatten(1).numpy(), expected, rtol=1e-10, atol=1e-12)

    def learned(xt, tt, y=None):  # 2C outputs: variance channel = the label, to see which half is kept
        return torch.cat([oracle(xt, tt, y=y), y.to(xt.dtype).view(-1, 1, 1, 1).expand_as(xt)], dim=1)

    learned.num_classes = 2
    out = ClassifierFreeGuidance(learned, w)(x, t, y=y)
    np.testing.assert_allclose(out[:, :1].flatten(1).numpy(), expected, rtol=1e-10, atol=1e-12)
    assert torch.equal(out[:, 1:], y.double().view(-1, 1, 1, 1).expand(-1, *SHAPE))


@pytest.mark.parametrize("sampler,steps", [("ddpm", 100), ("ddim", 50)])
def test_guidance_moves_samples_away_from_the_other_class(diffusion, sampler, steps):
    oracle = MixtureOracle(diffusion.alphas_cumprod)
    y = torch.zeros(N, dtype=torch.long)
    # same noise for every w, so the differences are the guidance's, not Monte Carlo's
    distance = [
        (draw(diffusion, oracle, y, sampler=sampler, steps=steps, guidance_scale=w) - MEANS[1]).abs().mean().item()
        for w in (0.0, 1.0, 3.0)
    ]
    assert distance[0] == pytest.approx(MEANS[1] - MEANS[0], abs=0.01)  # w = 0: the class itself
    assert distance[0] + 0.015 < distance[1] < distance[2] - 0.015


def mixture_eps(abar):
    """The unconditional model: eps* of the mixture, without labels."""
    oracle = MixtureOracle(abar)
    return lambda x, t: oracle(x, t)


@pytest.mark.parametrize("sampler,steps,tolerance", [("ddpm", None, 0.015), ("ddim", 50, 0.015), ("ddpm", 100, 0.06)])
def test_classifier_guidance_with_the_exact_classifier_moves_samples_to_the_class(diffusion, sampler, steps, tolerance):
    """Scale 1 with the exact classifier samples p(x | y) in the limit of small steps; 100 ancestral steps
    with the fixed_small variance shift the mean by too little (0.93 of the samples land at their class
    instead of 0.977), so that case gets a wider tolerance."""
    abar = diffusion.alphas_cumprod
    seen = set()

    def classifier(x, t):
        seen.update(t.tolist())
        return true_logits(abar, x, t)

    y = labels()
    kwargs = dict(sampler=sampler, steps=steps, classifier=classifier)
    unguided = draw(diffusion, mixture_eps(abar), y, classifier_scale=0.0, **kwargs)
    guided = draw(diffusion, mixture_eps(abar), y, classifier_scale=1.0, **kwargs)
    # respaced runs hand the classifier the original timesteps, the ones the network sees
    kept = range(T) if steps is None else respaced(diffusion, steps).timestep_map.tolist()
    assert seen == set(kept)
    side = torch.cat([torch.zeros(N), torch.ones(N)]).double()
    hit = lambda x: ((x.flatten(1).mean(1) > 0).double() == side).double().mean().item()  # noqa: E731
    assert hit(unguided) == pytest.approx(0.5, abs=0.05)
    # under p(x | y) an image's pixel mean is N(m_y, s^2 / 4): on its class's side of 0 with probability
    # Phi(2 |m_y| / s), and the class's pixels average m_y
    assert hit(guided) == pytest.approx(0.5 * (1 + math.erf(2 * MEANS[1] / S / math.sqrt(2))), abs=tolerance)
    for k, m in enumerate(MEANS):
        assert guided[k * N : (k + 1) * N].mean().item() == pytest.approx(m, abs=2 * tolerance)


def test_trajectory_and_denoise_from_take_labels(diffusion):
    oracle = MixtureOracle(diffusion.alphas_cumprod)
    y = torch.tensor([0, 1, 1, 0])
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    options, guidance = SamplerOptions(steps=20), Guidance(y=y, scale=1.0)
    plain = sample(diffusion, oracle, (4, *SHAPE), options, guidance, generator=gen())
    traj = sample_trajectory(diffusion, oracle, (4, *SHAPE), options, guidance, generator=gen())
    assert torch.equal(traj.sample, plain)
    noise = torch.randn(4, *SHAPE, generator=gen())
    decoded = denoise_from(diffusion, oracle, noise, T - 1, SamplerOptions("ddim", steps=20), Guidance(y=y))
    assert torch.equal(
        decoded, sample(diffusion, oracle, (4, *SHAPE), SamplerOptions("ddim", steps=20), Guidance(y=y), noise=noise)
    )


def test_label_dropout_rate_is_binomial():
    y = torch.randint(0, 10, (200_000,), generator=torch.Generator().manual_seed(0))
    for p in (0.0, 0.1, 0.5):
        dropped = drop_labels(y, p, null=10, generator=torch.Generator().manual_seed(1))
        is_null = dropped == 10
        sd = math.sqrt(len(y) * p * (1 - p))
        assert abs(is_null.sum().item() - len(y) * p) <= 5 * sd
        assert torch.equal(dropped[~is_null], y[~is_null])  # kept labels are unchanged


def test_bad_guidance_inputs_are_one_line_errors():
    uncond = lambda x, t: x  # noqa: E731
    cond = MixtureOracle(torch.ones(T))
    y = torch.tensor([0, 1])
    cases = [
        (lambda: guide(uncond, y, 3.0), "needs a class-conditional model"),
        (lambda: guide(uncond, y), "the model is unconditional"),
        (lambda: guide(cond, None, 1.0), "needs class labels"),
        (lambda: guide(cond, None, classifier=uncond), "needs class labels"),
        (lambda: guide(cond, torch.tensor([0, 2])), r"labels must lie in 0..1"),
        (lambda: guide(cond, torch.tensor([0.0, 1.0])), "integer tensor"),
        (lambda: drop_labels(y, 1.5, null=2), "label dropout must be in"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_classifier_guidance_gradient_is_the_analytic_score():
    """cond_fn = s * grad log p(y | x_t) = s * (sqrt(abar) (m_y - E[m | x_t])) / v for the mixture."""
    abar = torch.cumprod(1 - make_beta_schedule("linear", T), 0)
    x = torch.randn(5, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([0, 100, 300, 700, 999])
    y = torch.tensor([0, 1, 1, 0, 1])
    grad = classifier_guidance(lambda xx, tt: true_logits(abar, xx, tt), 2.0, y)(x, t)
    a = abar[t].view(-1, 1, 1, 1)
    v = a * S**2 + 1 - a
    post = true_logits(abar, x, t).softmax(1)
    m = torch.tensor(MEANS, dtype=torch.float64)
    expected = 2.0 * a.sqrt() * (m[y] - post @ m).view(-1, 1, 1, 1) / v
    torch.testing.assert_close(grad, expected.expand_as(x))
