"""Timestep samplers: uniform, and improved DDPM's loss-aware importance sampling (Sec. 3.3)."""

import numpy as np
import pytest
import torch

from src.diffusion import LossSecondMomentResampler, UniformSampler

HISTORY = 10
UNIFORM_PROB = 0.001


def test_uniform_sampler_weights_and_range():
    sampler = UniformSampler(20)
    t, w = sampler.sample(20000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert t.shape == w.shape == (20000,) and t.dtype == torch.long
    assert torch.equal(w, torch.ones(20000))
    assert int(t.min()) == 0 and int(t.max()) == 19
    counts = np.bincount(t.numpy(), minlength=20)
    assert (counts > 0).all()
    # 1000 expected per value, binomial sd ~31: every count within 5 sd.
    assert np.abs(counts - 1000).max() < 5 * np.sqrt(20000 * 0.05 * 0.95)
    np.testing.assert_allclose(sampler.weights(), np.full(20, 1 / 20))


def test_uniform_sampler_is_seeded():
    sampler = UniformSampler(1000)
    a, _ = sampler.sample(64, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    b, _ = sampler.sample(64, torch.device("cpu"), generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


def fill(sampler, losses_per_t: dict, rng, num_timesteps: int, rounds: int, skip=()):
    """Record `rounds` random losses for every t (except `skip`), in a shuffled order, also keeping
    them in losses_per_t (t -> list) for the closed form."""
    ts = np.repeat([t for t in range(num_timesteps) if t not in skip], rounds)
    rng.shuffle(ts)
    scale = 1.0 + np.arange(num_timesteps)  # losses grow with t, so the distribution is far from uniform
    losses = rng.exponential(scale[ts])
    for t, loss in zip(ts, losses):
        losses_per_t.setdefault(int(t), []).append(float(loss))
    # Feed in a few batches of different sizes, as a training loop would.
    for chunk in np.array_split(np.arange(len(ts)), 7):
        sampler.update(torch.from_numpy(ts[chunk]), torch.from_numpy(losses[chunk]).float())


def closed_form_probs(losses_per_t: dict, num_timesteps: int) -> np.ndarray:
    """p_t = (1 - 0.001) sqrt(E[L_t^2]) / sum_s sqrt(E[L_s^2]) + 0.001 / T over the last 10 losses."""
    rms = np.array(
        [
            np.sqrt(np.mean(np.square(np.float32(losses_per_t[t][-HISTORY:]), dtype=np.float64)))
            for t in range(num_timesteps)
        ]
    )
    return (1 - UNIFORM_PROB) * rms / rms.sum() + UNIFORM_PROB / num_timesteps


def test_resampler_is_uniform_until_every_t_has_a_full_history():
    num_timesteps = 8
    rng = np.random.default_rng(0)
    sampler = LossSecondMomentResampler(num_timesteps)
    losses = {}
    fill(sampler, losses, rng, num_timesteps, rounds=HISTORY - 1)
    fill(sampler, losses, rng, num_timesteps, rounds=1, skip={5})  # t=5 still has only 9 losses
    np.testing.assert_array_equal(sampler.weights(), np.full(num_timesteps, 1 / num_timesteps))
    _, w = sampler.sample(1000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    np.testing.assert_allclose(w.numpy(), 1.0, rtol=1e-6)
    # The tenth loss of t=5 completes the history: from then on the distribution follows the losses.
    fill(sampler, losses, rng, num_timesteps, rounds=1, skip=set(range(num_timesteps)) - {5})
    probs = sampler.weights()
    np.testing.assert_allclose(probs, closed_form_probs(losses, num_timesteps), rtol=1e-6)
    assert probs.max() / probs.min() > 3


def test_resampler_probabilities_and_weights():
    num_timesteps = 50
    rng = np.random.default_rng(1)
    sampler = LossSecondMomentResampler(num_timesteps)
    losses = {}
    fill(sampler, losses, rng, num_timesteps, rounds=HISTORY + 3)  # overflow the history by 3
    expected = closed_form_probs(losses, num_timesteps)
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-6)
    assert sampler.weights().sum() == pytest.approx(1.0, abs=1e-12)
    # Samples follow p, and each carries the importance weight 1 / (T p_t).
    n = 200000
    t, w = sampler.sample(n, torch.device("cpu"), generator=torch.Generator().manual_seed(2))
    np.testing.assert_allclose(w.numpy(), 1.0 / (num_timesteps * expected[t.numpy()]), rtol=1e-5)
    counts = np.bincount(t.numpy(), minlength=num_timesteps)
    sd = np.sqrt(n * expected * (1 - expected))
    assert (np.abs(counts - n * expected) < 5 * sd).all()


def test_importance_weights_make_the_estimate_unbiased():
    num_timesteps = 100
    rng = np.random.default_rng(3)
    sampler = LossSecondMomentResampler(num_timesteps)
    fill(sampler, {}, rng, num_timesteps, rounds=HISTORY)
    f = np.sin(np.arange(num_timesteps) / 7.0) + np.arange(num_timesteps) / 50.0  # any per-t quantity
    uniform_mean = f.mean()
    n = 200000
    t, w = sampler.sample(n, torch.device("cpu"), generator=torch.Generator().manual_seed(4))
    values = w.double().numpy() * f[t.numpy()]
    se = values.std() / np.sqrt(n)
    assert abs(values.mean() - uniform_mean) < 5 * se
    # Without the weights the estimate is biased by many standard errors (the check has teeth).
    unweighted = f[t.numpy()]
    assert abs(unweighted.mean() - uniform_mean) > 20 * unweighted.std() / np.sqrt(n)


def test_history_keeps_only_the_last_losses():
    num_timesteps = 4
    sampler = LossSecondMomentResampler(num_timesteps)
    for t in range(1, num_timesteps):
        sampler.update(torch.full((HISTORY,), t), torch.ones(HISTORY))
    # t=0 gets 5 huge losses first, then 10 ones: only the last 10 (all ones) may count.
    sampler.update(torch.zeros(5, dtype=torch.long), torch.full((5,), 1000.0))
    sampler.update(torch.zeros(HISTORY, dtype=torch.long), torch.ones(HISTORY))
    np.testing.assert_allclose(sampler.weights(), np.full(num_timesteps, 0.25), rtol=1e-12)
    # One more large loss at t=0 displaces exactly one of the ones: rms = sqrt((9 + 100^2)/10).
    sampler.update(torch.tensor([0]), torch.tensor([100.0]))
    rms = np.array([np.sqrt((9 + 100.0**2) / 10), 1.0, 1.0, 1.0])
    expected = (1 - UNIFORM_PROB) * rms / rms.sum() + UNIFORM_PROB / num_timesteps
    np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-9)


def test_state_survives_state_dict_round_trip():
    num_timesteps = 30
    rng = np.random.default_rng(5)
    sampler = LossSecondMomentResampler(num_timesteps)
    losses = {}
    fill(sampler, losses, rng, num_timesteps, rounds=HISTORY + 2)
    state = sampler.state_dict()
    assert state  # the history travels as extra state

    fresh = LossSecondMomentResampler(num_timesteps)
    np.testing.assert_allclose(fresh.weights(), 1 / num_timesteps)
    fresh.load_state_dict(state)
    np.testing.assert_array_equal(fresh.weights(), sampler.weights())
    np.testing.assert_allclose(fresh.weights(), closed_form_probs(losses, num_timesteps), rtol=1e-6)
    # Later updates continue the same history on both (the full-history counts came along too).
    update_t, update_l = torch.tensor([3, 3, 17]), torch.tensor([50.0, 60.0, 0.5])
    for s in (sampler, fresh):
        s.update(update_t, update_l)
    for t, loss in zip(update_t.tolist(), update_l.tolist()):
        losses[t].append(loss)
    np.testing.assert_array_equal(fresh.weights(), sampler.weights())
    np.testing.assert_allclose(fresh.weights(), closed_form_probs(losses, num_timesteps), rtol=1e-6)
    a, _ = sampler.sample(100, torch.device("cpu"), generator=torch.Generator().manual_seed(6))
    b, _ = fresh.sample(100, torch.device("cpu"), generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b)


def test_partial_history_survives_round_trip():
    # A sampler saved during warm-up is still warming up after loading, with its counts intact.
    sampler = LossSecondMomentResampler(3)
    sampler.update(torch.tensor([0, 1, 2] * (HISTORY - 1) + [0, 1]), torch.arange(3 * (HISTORY - 1) + 2).float())
    fresh = LossSecondMomentResampler(3)
    fresh.load_state_dict(sampler.state_dict())
    np.testing.assert_allclose(fresh.weights(), 1 / 3)
    fresh.update(torch.tensor([2]), torch.tensor([1.0]))  # the 10th loss of t=2 completes the history
    assert not np.allclose(fresh.weights(), 1 / 3)


def test_loading_a_different_num_timesteps_raises():
    sampler = LossSecondMomentResampler(30)
    sampler.update(torch.arange(30), torch.ones(30))
    with pytest.raises(ValueError):
        LossSecondMomentResampler(40).load_state_dict(sampler.state_dict())
