"""Timestep spacing and the respaced process, against improved-diffusion's documented sections, DDIM's
spacings, diffusers' timesteps and the closed forms of the respaced betas."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from src.diffusion import GaussianDiffusion, SpacedDiffusion, respaced, space_timesteps

T = 1000
BETAS = np.linspace(1e-4, 0.02, T)
ABAR = np.cumprod(1.0 - BETAS)


def improved_diffusion_sections(num_timesteps: int, section_counts: list[int]) -> list[int]:
    """improved-diffusion's respace.space_timesteps for section counts, transcribed (float accumulation
    of the stride included, it decides the half-way roundings)."""
    size_per, extra = num_timesteps // len(section_counts), num_timesteps % len(section_counts)
    start_idx, all_steps = 0, []
    for i, section_count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


# --- sections (improved-diffusion) -----------------------------------------------------------------
def test_documented_sections_example():
    """improved-diffusion's docstring: 300 timesteps with counts [10, 15, 20] -> the first 100 strided to
    10 steps, the second 100 to 15, the last 100 to 20."""
    steps = space_timesteps(300, "10,15,20")
    assert len(steps) == 45 and steps == sorted(steps)
    first, second, third = steps[:10], steps[10:25], steps[25:]
    assert first == list(range(0, 100, 11))  # stride 99 / 9 = 11 exactly
    assert all(0 <= s < 100 for s in first) and all(100 <= s < 200 for s in second)
    assert all(200 <= s < 300 for s in third)
    for section, start, count in [(first, 0, 10), (second, 100, 15), (third, 200, 20)]:
        assert section[0] == start and section[-1] == start + 99  # each section spans its 100 steps
        gaps = np.diff(section)
        stride = 99 / (count - 1)
        assert (np.abs(gaps - stride) <= 1).all()
    assert steps == improved_diffusion_sections(300, [10, 15, 20])


@pytest.mark.parametrize("num_timesteps", [50, 100, 300, 1000, 4000])
def test_even_spacing_matches_improved_diffusion(num_timesteps):
    # One step: improved-diffusion keeps t = 0 (a run that starts from noise at the cleanest step); here the
    # one step goes from T - 1 to 0.
    assert space_timesteps(num_timesteps, 1) == [num_timesteps - 1]
    for count in range(2, num_timesteps + 1, max(1, num_timesteps // 150)):
        assert space_timesteps(num_timesteps, count) == improved_diffusion_sections(num_timesteps, [count]), count
    for counts in ([10, 15, 20], [3, 7], [5, 5, 5, 5], [1, 2]):
        if num_timesteps // len(counts) >= max(counts):
            text = ",".join(map(str, counts))
            assert space_timesteps(num_timesteps, text) == improved_diffusion_sections(num_timesteps, counts)


def test_half_way_roundings_follow_improved_diffusion():
    # 25 of 50: the 13th index is 12 * 49/24 = 24.5 in exact arithmetic, 24.500000000000004 as
    # improved-diffusion sums it, so it keeps 25 (round(24.5) would give 24).
    assert 25 in space_timesteps(50, 25) and 24 not in space_timesteps(50, 25)
    assert space_timesteps(1000, 50) == improved_diffusion_sections(1000, [50])
    assert space_timesteps(T, "uniform:50") == space_timesteps(T, 50) == space_timesteps(T, "50")


def test_even_spacing_keeps_both_ends():
    for n in (2, 10, 50, 100, 999, 1000):
        steps = space_timesteps(T, n)
        assert len(steps) == n and steps[0] == 0 and steps[-1] == T - 1


# --- DDIM spacings --------------------------------------------------------------------------------
def test_ddim_stride_matches_diffusers_leading_spacing():
    for n in (10, 20, 25, 50, 100, 200):  # divisors of T: stride T // n
        scheduler = DDIMScheduler(num_train_timesteps=T, steps_offset=0, timestep_spacing="leading")
        scheduler.set_timesteps(n)
        assert space_timesteps(T, f"ddim{n}") == sorted(scheduler.timesteps.tolist()) == list(range(0, T, T // n))


def test_ddim_stride_is_improved_diffusions_search():
    # 30 of 1000: the smallest stride with exactly 30 steps is 34 (T // 30 = 33 gives 31 steps), where
    # diffusers' "leading" keeps 30 steps of stride 33 (pass its list to reproduce it).
    assert space_timesteps(T, "ddim30") == list(range(0, T, 34))
    with pytest.raises(ValueError, match="exactly 11 equally strided steps"):
        space_timesteps(100, "ddim11")  # strides 9 and 10 give 12 and 10 steps


@pytest.mark.parametrize("n", [5, 10, 16, 21, 26, 27])
def test_quad_spacing_is_ddims_formula(n):
    # DDIM (runners/diffusion.py): seq = [int(s) for s in np.linspace(0, np.sqrt(T * 0.8), n) ** 2]
    expected = [int(s) for s in list(np.linspace(0, np.sqrt(T * 0.8), n) ** 2)]
    steps = space_timesteps(T, f"quad{n}")
    assert steps == expected
    assert np.all(np.diff(np.diff(steps)) >= -1)  # gaps grow: denser at small t


def test_quad_spacing_rejects_repeated_steps():
    with pytest.raises(ValueError, match="repeats timesteps"):
        space_timesteps(T, "quad40")  # int(linspace^2) gives 0, 0, ... at the start


@pytest.mark.parametrize(
    "bad, message",
    [
        ("abc", "unknown timestep spacing"),
        ("ddimx", "unknown timestep spacing"),
        ("quad", "unknown timestep spacing"),
        ("", "unknown timestep spacing"),
        ("10,,20", "unknown timestep spacing"),
        ("0", r"must be in \[1, 1000\]"),
        ("1001", r"must be in \[1, 1000\]"),
        ("10,0", r"must be in \[1, 1000\]"),
        ("600,600", "cannot take 600 steps from a section of 500"),
        ([], r"must lie in \[0, 1000\)"),
        ([-1, 5], r"must lie in \[0, 1000\)"),
        ([0, 1000], r"must lie in \[0, 1000\)"),
    ],
)
def test_bad_spacings_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        space_timesteps(T, bad)


def test_explicit_list_is_sorted_and_deduplicated():
    assert space_timesteps(T, [999, 0, 500, 500]) == [0, 500, 999]


# --- the respaced process -------------------------------------------------------------------------
def make(var_type: str = "fixed_small") -> GaussianDiffusion:
    return GaussianDiffusion(
        torch.from_numpy(BETAS), var_type=var_type, loss_type="hybrid" if var_type == "learned_range" else "simple"
    )


@pytest.mark.parametrize("spacing", ["50", "ddim50", "quad20", "10,15,20", [3, 10, 500, 999]])
def test_respaced_alphas_cumprod_equal_the_base_at_kept_steps(spacing):
    kept = space_timesteps(T, spacing)
    spaced = respaced(make(), spacing=spacing)
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == len(kept)
    np.testing.assert_allclose(spaced.alphas_cumprod.numpy(), ABAR[kept], rtol=1e-12)
    # beta'_k = 1 - abar_{s_k} / abar_{s_{k-1}} (abar = 1 before the first kept step)
    prev = np.concatenate([[1.0], ABAR[kept][:-1]])
    np.testing.assert_allclose(spaced.betas.numpy(), 1.0 - ABAR[kept] / prev, rtol=1e-12)
    assert spaced.timestep_map.tolist() == kept


def test_respaced_betas_match_diffusers_strided_ddpm():
    """DDPMScheduler.set_timesteps(S) uses beta_t' = 1 - abar_t / abar_prev_t with its previous_timestep
    (abar = 1 after the last); evaluated here with float64 abar (diffusers stores float32)."""
    scheduler = DDPMScheduler(num_train_timesteps=T, trained_betas=BETAS)
    scheduler.set_timesteps(40)
    kept = sorted(scheduler.timesteps.tolist())
    spaced = SpacedDiffusion(make(), kept)
    for k, t in enumerate(kept):
        prev_t = int(scheduler.previous_timestep(t))
        theirs = 1.0 - ABAR[t] / (ABAR[prev_t] if prev_t >= 0 else 1.0)
        assert spaced.betas[k].item() == pytest.approx(theirs, rel=1e-12)


def test_respaced_calls_the_network_with_original_timesteps():
    seen = []
    spaced = respaced(make(), spacing=[0, 250, 999])
    x = torch.zeros(2, 1, 2, 2)
    for k in range(3):
        spaced.p_mean_variance(lambda xt, t: (seen.append(t.tolist()), torch.zeros_like(xt))[1], x, torch.full((2,), k))
    assert seen == [[0, 0], [250, 250], [999, 999]]


def test_respaced_learned_range_interpolates_between_respaced_betas():
    spaced = respaced(make("learned_range"), steps=50)
    kept = space_timesteps(T, 50)
    prev = np.concatenate([[1.0], ABAR[kept][:-1]])
    beta = 1.0 - ABAR[kept] / prev
    beta_tilde = beta * (1.0 - prev) / (1.0 - ABAR[kept])
    x = torch.zeros(3, 1, 1, 1, dtype=torch.float64)
    for k in (1, 10, 49):
        out = torch.cat([x, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64).view(3, 1, 1, 1)], dim=1)
        log_var = spaced.p_mean_variance(lambda xt, t: out, x, torch.full((3,), k))["log_variance"].flatten()
        expected = [np.log(beta_tilde[k]), 0.5 * (np.log(beta_tilde[k]) + np.log(beta[k])), np.log(beta[k])]
        np.testing.assert_allclose(log_var.numpy(), expected, rtol=1e-12)


def test_respaced_is_the_diffusion_itself_for_all_steps():
    diffusion = make()
    assert respaced(diffusion) is diffusion
    assert respaced(diffusion, steps=T) is diffusion
    assert isinstance(respaced(diffusion, spacing=str(T)), SpacedDiffusion)  # an explicit spacing respaces
