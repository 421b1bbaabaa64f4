"""Inputs that used to lose data or pass silently: each is refused with one line that names the fix, and
nothing already on disk changes."""

from pathlib import Path

import pytest
import torch

from src.diffusion import GaussianDiffusion
from src.errors import CheckpointError, ConfigError
from src.training import resolve_ckpt_path, train


@pytest.mark.slow
def test_a_fresh_run_never_replaces_a_trained_checkpoint(compose_train):
    cfg = compose_train("trainer.max_steps=2")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"trained weights")
    before = sorted(p.name for p in Path(cfg.paths.output_dir).rglob("*"))
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message and "ckpt_path=last" in message and "overwrite=true" in message
    assert last.read_bytes() == b"trained weights"
    assert sorted(p.name for p in Path(cfg.paths.output_dir).rglob("*")) == before  # nothing else was written
    assert resolve_ckpt_path(compose_train("overwrite=true")) is None  # starting over there is a choice


def test_ckpt_path_to_a_folder_says_so(compose_train, tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; give a .ckpt file such as"):
        resolve_ckpt_path(compose_train(f"ckpt_path={tmp_path}"))


@pytest.mark.slow
@pytest.mark.parametrize("value", ["0", "abc", "-5", "2.5"])
def test_max_steps_must_be_a_step_count(compose_train, value):
    with pytest.raises(ConfigError, match=r"trainer.max_steps must be a positive integer \(or -1"):
        train(compose_train(f"trainer.max_steps={value}"))


@pytest.mark.slow
def test_hybrid_loss_with_a_fixed_variance_is_refused(compose_train):
    with pytest.raises(ConfigError, match="objective=hybrid needs objective.var_type=learned_range"):
        train(compose_train("objective=hybrid", "objective.var_type=fixed_large", "trainer.max_steps=1"))


def test_eps_prediction_at_zero_snr_is_refused_by_the_library():
    betas = torch.linspace(1e-4, 1.0, 20, dtype=torch.float64)  # T=20 linear: beta_T = 1, alpha_bar_T = 0
    with pytest.raises(ValueError, match="alphas_cumprod reaches 0 at t=19 .* mean_type='eps' is undefined at SNR 0"):
        GaussianDiffusion(betas, mean_type="eps")
    assert GaussianDiffusion(betas, mean_type="x0").alphas_cumprod[-1] == 0  # defined for an x0 target


def test_classifier_free_guidance_needs_a_null_label():
    from src.sampling.conditioning import check_guidance, guidance_scales

    assert guidance_scales(None, 1000, null_label=False) == [0.0]  # ADM's released nets: no sweep by default
    assert guidance_scales(None, 10) == [0.0, 1.0, 3.0]
    # not configured: the run's own scale for a conditional net (evaluate.py / sample.py default), given: as given
    assert guidance_scales(None, 10, run_scale=1.5) == [1.5] and guidance_scales([0, 2], 10, run_scale=1.5) == [0, 2]
    assert guidance_scales(None, None, run_scale=1.5) == [0.0]  # unconditional nets cannot be guided this way
    assert guidance_scales(None, 10, fallback=(0.0,)) == [0.0]  # sample.py's fallback: no sweep
    check_guidance(1000, [0.0], classifier=True, null_label=False)
    with pytest.raises(ConfigError, match="has none \\(model.null_label=false"):
        check_guidance(1000, [0.0, 1.0], classifier=False, null_label=False)
