"""Post-hoc EMA (EDM2, Karras et al. 2024, Sec. 3 and App. C) against its closed forms, and end to end.

Closed forms used here (independent of src.lit.ema_profiles' code):
- sigma_rel(gamma)^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)); EDM2 quotes gamma = 16.97 for sigma_rel = 0.05
  and 6.94 for 0.10.
- The tracked EMA with beta_t = (1 - 1/t)^(gamma + 1) weighs theta_tau, after t updates, by
  (1 - beta_tau) prod_{s > tau} beta_s = (tau / t)^(gamma + 1) - ((tau - 1) / t)^(gamma + 1).
- A combination of profiles sum_i x_i p_i applied to a sequence theta (piecewise constant on (tau - 1, tau])
  differs from the target profile's average by at most ||sum_i x_i p_i - p*|| ||theta|| (Cauchy-Schwarz), with
  ||theta||^2 = sum_tau theta_tau^2 and ||p*||^2 = (gamma + 1)^2 / ((2 gamma + 1) t).
"""

import math

import numpy as np
import pytest
import torch
from conftest import FAST_OVERRIDES
from test_resume import assert_identical
from torch import nn

from src import atomic
from src.callbacks import PostHocEMA
from src.errors import CheckpointError, ConfigError
from src.lit import PowerFunctionEMA
from src.lit.ema_profiles import gamma_to_std, profile_inner_products, solve_coefficients, std_to_gamma
from src.sampling.ema_rebuild import reconstruct, snapshots_folder
from src.training import train

pytestmark = pytest.mark.usefixtures("single_thread")


def discrete_weights(gamma: float, t: int) -> np.ndarray:
    tau = np.arange(1, t + 1, dtype=np.float64)
    return (tau / t) ** (gamma + 1) - ((tau - 1) / t) ** (gamma + 1)


class Scalar(nn.Module):
    def __init__(self):
        super().__init__()
        self.theta = nn.Parameter(torch.zeros((), dtype=torch.float64))


# --- closed forms ---------------------------------------------------------------------------------
@pytest.mark.parametrize("std, gamma", [(0.05, 16.97), (0.10, 6.94)])
def test_std_to_gamma_matches_the_papers_values(std, gamma):
    assert std_to_gamma(std) == pytest.approx(gamma, abs=0.005)


@pytest.mark.parametrize("gamma", [0.0, 0.5, 3.0, 6.94, 16.97, 50.0])
def test_std_and_gamma_round_trip(gamma):
    std = math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))
    assert gamma_to_std(gamma) == pytest.approx(std, rel=1e-14)
    assert std_to_gamma(std) == pytest.approx(gamma, rel=1e-9, abs=1e-9)


@pytest.mark.parametrize("std", [0.0, -0.1, 0.3, True])
def test_std_outside_the_range_is_an_error(std):
    with pytest.raises(ValueError, match=r"ema std must be a number in \(0, 0\.2887\]"):
        std_to_gamma(std)


def test_inner_products_are_the_integrals_of_the_profiles():
    # integral_0^min(ta,tb) (a+1) tau^a / ta^(a+1) * (b+1) tau^b / tb^(b+1) d tau, by the midpoint rule
    for (ta, a), (tb, b) in [((300.0, 2.0), (500.0, 7.0)), ((500.0, 7.0), (300.0, 2.0)), ((400.0, 3.0), (400.0, 3.0))]:
        n = 200_000
        tau = (np.arange(n) + 0.5) * min(ta, tb) / n
        integrand = (a + 1) * tau**a / ta ** (a + 1) * (b + 1) * tau**b / tb ** (b + 1)
        assert profile_inner_products(ta, a, tb, b) == pytest.approx(integrand.sum() * min(ta, tb) / n, rel=1e-6)


@pytest.mark.parametrize("std", [0.05, 0.10])
def test_tracked_power_ema_of_a_scalar_is_the_weighted_sum_with_the_profile_weights(std):
    rng = np.random.default_rng(0)
    thetas = rng.normal(size=60).cumsum()
    net, gamma = Scalar(), std_to_gamma(std)
    ema = PowerFunctionEMA(net, gamma)
    with torch.no_grad():
        net.theta.fill_(123.0)
        ema.model.theta.fill_(-7.0)  # the initial copy gets weight 0 (beta_1 = 0)
    for t, theta in enumerate(thetas, start=1):
        with torch.no_grad():
            net.theta.fill_(float(theta))
        ema.update(net)
        expected = float(discrete_weights(gamma, t) @ thetas[:t])
        assert float(ema.model.theta) == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_reconstruction_of_an_untracked_width_is_within_the_fit_bound():
    # Two tracked widths, snapshots every 50 of 2000 steps, target 0.08 at the last step.
    rng = np.random.default_rng(1)
    t_end, every = 2000, 50
    thetas = np.sin(np.arange(1, t_end + 1) / 150.0) + 0.05 * rng.normal(size=t_end).cumsum()
    gammas = [std_to_gamma(0.05), std_to_gamma(0.10)]
    steps, snap_gammas, values = [], [], []
    for t in range(every, t_end + 1, every):
        for g in gammas:
            steps.append(t)
            snap_gammas.append(g)
            values.append(float(discrete_weights(g, t) @ thetas[:t]))
    target = std_to_gamma(0.08)
    x, fit_error = solve_coefficients(steps, snap_gammas, t_end, target)
    exact = float(discrete_weights(target, t_end) @ thetas)
    target_norm = (target + 1) / math.sqrt((2 * target + 1) * t_end)
    bound = fit_error * target_norm * math.sqrt(float(thetas @ thetas))
    assert fit_error < 0.01
    assert abs(float(x @ values) - exact) <= bound + 1e-9
    # and a visibly different answer from either tracked width
    for g in gammas:
        assert abs(float(discrete_weights(g, t_end) @ thetas) - exact) > 10 * abs(float(x @ values) - exact)


def test_a_tracked_width_is_reconstructed_exactly_from_its_own_final_snapshot():
    steps, gammas = [10, 10, 20, 20], [std_to_gamma(0.05), std_to_gamma(0.10)] * 2
    x, fit_error = solve_coefficients(steps, gammas, 20, std_to_gamma(0.10))
    np.testing.assert_allclose(x, [0, 0, 0, 1], atol=1e-6)
    assert fit_error < 1e-6


# --- training with the snapshots -------------------------------------------------------------------
# A tiny CPU run: snapshots every 4 steps of 24, no validation, no sample grids.
PHEMA = [
    "posthoc_ema.enabled=true",
    "posthoc_ema.stds=[0.05,0.10]",
    "posthoc_ema.every_n_steps=4",
    "callbacks.sample_grid=null",
    "+trainer.limit_val_batches=0",
    "trainer.deterministic=true",
    "+trainer.limit_train_batches=5",
    "trainer.log_every_n_steps=1",
    "callbacks.model_checkpoint.every_n_train_steps=5",
]


def tracked(run) -> PostHocEMA:
    _, objects = run
    return next(c for c in objects["trainer"].callbacks if isinstance(c, PostHocEMA))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, compose_config):

    folder = tmp_path_factory.mktemp("phema")
    cfg = compose_config(
        "train", *FAST_OVERRIDES, *PHEMA, "trainer.max_steps=24", output_dir=folder / "run", data_dir=folder / "data"
    )
    return folder / "run", train(cfg)


def test_snapshots_are_written_every_n_steps_with_their_step_and_gamma(trained_run):
    run_dir, run = trained_run
    files = sorted(p.name for p in (run_dir / "checkpoints" / "phema").iterdir())
    assert files == [f"phema-{s:07d}-{std:.4f}.pt" for s in range(4, 25, 4) for std in (0.05, 0.10)]
    snapshot = torch.load(run_dir / "checkpoints" / "phema" / "phema-0000024-0.1000.pt", weights_only=True)
    assert snapshot["step"] == 24 and snapshot["std"] == 0.10
    assert snapshot["gamma"] == pytest.approx(6.94, abs=0.005)
    callback = tracked(run)
    assert [e.num_updates for e in callback.emas] == [24, 24]
    for name, value in callback.emas[1].model.named_parameters():
        assert torch.equal(snapshot["parameters"][name], value)


def test_reconstructing_a_tracked_width_reproduces_the_tracked_ema(trained_run):
    run_dir, run = trained_run
    callback = tracked(run)
    folder = snapshots_folder(run_dir / "checkpoints" / "last.ckpt")
    rebuilt = reconstruct(folder, 0.10, 24)
    assert rebuilt.snapshot_steps.count(24) == 2 and len(rebuilt.snapshot_steps) == 12
    live = dict(run[1]["module"].net.named_parameters())
    other = dict(callback.emas[0].model.named_parameters())
    for name, value in callback.emas[1].model.named_parameters():
        error = (rebuilt.state[name] - value).norm()
        assert error <= 1e-3 * value.norm(), name
        # the two tracked widths and the live weights are all farther apart than that
        assert (other[name] - value).norm() > 0 or (live[name] - value).norm() == 0
    total = lambda a, b: sum(float((a[n] - b[n]).pow(2).sum()) for n in a) ** 0.5  # noqa: E731
    tracked_10 = dict(callback.emas[1].model.named_parameters())
    assert total({n: rebuilt.state[n] for n in tracked_10}, tracked_10) < 1e-2 * total(other, tracked_10)


def test_resume_continues_the_tracked_profiles_and_snapshots_bit_for_bit(trained_run, compose_config, tmp_path):

    run_dir, straight = trained_run
    first = compose_config(
        "train",
        *FAST_OVERRIDES,
        *PHEMA,
        "trainer.max_steps=12",
        output_dir=tmp_path / "run",
        data_dir=run_dir.parent / "data",
    )
    train(first)
    second = compose_config(
        "train",
        *FAST_OVERRIDES,
        *PHEMA,
        "trainer.max_steps=24",
        "ckpt_path=last",
        output_dir=tmp_path / "run",
        data_dir=run_dir.parent / "data",
    )
    resumed = train(second)
    for a, b in zip(tracked(straight).emas, tracked(resumed).emas):
        assert a.num_updates == b.num_updates == 24
        assert_identical(a.state_dict(), b.state_dict(), "tracked EMA")
    names = sorted(p.name for p in (run_dir / "checkpoints" / "phema").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "phema").iterdir())
    for name in names:
        assert_identical(
            torch.load(run_dir / "checkpoints" / "phema" / name, weights_only=True),
            torch.load(tmp_path / "run" / "checkpoints" / "phema" / name, weights_only=True),
            name,
        )
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["callbacks"]["PostHocEMA"]["stds"] == [0.05, 0.10]


# --- evaluate.py / sample.py ema_std --------------------------------------------------------------------
def test_evaluate_sweeps_ema_std_with_one_row_each_and_a_figure(trained_run, compose_config, tmp_path, capsys):
    from src.evaluation import run as evaluate_run

    run_dir, _ = trained_run
    cfg = compose_config(
        "evaluate",
        f"ckpt_path={run_dir}/checkpoints/last.ckpt",
        "ema_std=[0.05,0.08]",
        "num_samples=4",
        "batch_size=4",
        "extractor=digits",
        "reference=val",
        "kid_subset_size=4",
        "sampler=ddim",
        "steps=2",
        "metrics=[fid]",
        output_dir=tmp_path / "eval",
        data_dir=run_dir.parent / "data",
    )
    metrics = evaluate_run(cfg)
    runs = metrics["posthoc_ema"]["runs"]
    assert [r["ema_std"] for r in runs] == [0.05, 0.08]
    assert all(isinstance(r["fd_digits-mlp64"], float) for r in runs)
    assert runs[0]["posthoc_ema"]["snapshot_steps"] == [4, 8, 12, 16, 20, 24]
    assert metrics["protocol"]["ema_std"] == [0.05, 0.08]
    assert [p["ema_std"] for p in metrics["protocol"]["posthoc_ema"]] == [0.05, 0.08]
    assert metrics["protocol"]["posthoc_ema"][1]["step"] == 24 and metrics["weights"] == "posthoc_ema"
    assert (tmp_path / "eval" / "quality_vs_ema_std.png").stat().st_size > 0
    assert (tmp_path / "eval" / "ema_std0.08" / "samples_grid.png").is_file()
    table = capsys.readouterr().out
    assert "ema_std=0.05 fd_digits-mlp64" in table and "ema_std=0.08 fd_digits-mlp64" in table


def test_sample_with_ema_std_uses_the_reconstructed_weights(trained_run, compose_config, tmp_path):
    from src.sampling.loading import load_checkpoint

    run_dir, run = trained_run
    cfg = compose_config(
        "sample",
        f"ckpt_path={run_dir}/checkpoints/last.ckpt",
        "ema_std=0.1",
        "device=cpu",
        output_dir=tmp_path / "sample",
        data_dir=run_dir.parent / "data",
    )
    loaded, _ = load_checkpoint(cfg)
    tracked_10 = tracked(run).emas[1].model
    for name, value in tracked_10.named_parameters():
        assert (loaded.net.get_parameter(name) - value).norm() <= 1e-3 * value.norm(), name
    classic = compose_config(
        "sample",
        f"ckpt_path={run_dir}/checkpoints/last.ckpt",
        "device=cpu",
        output_dir=tmp_path / "sample",
        data_dir=run_dir.parent / "data",
    )
    loaded, _ = load_checkpoint(classic)
    assert loaded.posthoc is None
    assert all(torch.equal(p, q) for p, q in zip(loaded.net.parameters(), run[1]["module"].ema.model.parameters()))


# --- errors and atomic writes -------------------------------------------------------------------------
def one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_a_checkpoint_without_snapshots_names_the_fix(trained_run, compose_config, tmp_path):
    from src.sampling.loading import load_checkpoint

    run_dir, _ = trained_run
    lonely = tmp_path / "other" / "checkpoints" / "last.ckpt"
    lonely.parent.mkdir(parents=True)
    lonely.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    cfg = compose_config(
        "sample",
        f"ckpt_path={lonely}",
        "ema_std=0.08",
        "device=cpu",
        output_dir=tmp_path / "s",
        data_dir=run_dir.parent / "data",
    )
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(cfg)
    assert "no post-hoc EMA snapshots" in one_line(err) and "train with posthoc_ema.enabled=true" in one_line(err)


def test_too_few_snapshots_for_an_ema_std_names_the_fix(tmp_path):
    # one snapshot, of the 0.10 profile at step 24: 0.05 is far from anything it can represent
    folder = tmp_path / "phema"
    folder.mkdir()
    torch.save(
        {"step": 24, "std": 0.10, "gamma": std_to_gamma(0.10), "parameters": {"w": torch.ones(2)}, "buffers": {}},
        folder / "phema-0000024-0.1000.pt",
    )
    assert reconstruct(folder, 0.10, 24).fit_error < 1e-9
    with pytest.raises(ConfigError) as err:
        reconstruct(folder, 0.05, 24)
    assert "represent it only to" in one_line(err) and "train with posthoc_ema.enabled=true" in one_line(err)
    with pytest.raises(CheckpointError, match="no post-hoc EMA snapshots for the checkpoint's step 20"):
        reconstruct(folder, 0.10, 20)  # the snapshot is later than the checkpoint


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.5", r"ema_std must be a number in \(0, 0\.2887\]"),
        ("[0.05,0.05]", "ema_std must be a number or distinct numbers"),
    ],
)
def test_bad_ema_std_is_one_line(value, message):
    from omegaconf import OmegaConf

    from src.sampling.ema_rebuild import checked_stds

    with pytest.raises(ConfigError, match=message) as err:
        checked_stds(OmegaConf.create({"v": OmegaConf.create(value) if value.startswith("[") else float(value)}).v)
    one_line(err)


@pytest.mark.parametrize(
    "override, message",
    [
        ("posthoc_ema.stds=[0.05,0.5]", r"posthoc_ema.stds values must be a number in \(0, 0\.2887\]"),
        ("posthoc_ema.every_n_steps=0", "posthoc_ema.every_n_steps must be a positive integer"),
    ],
)
def test_bad_posthoc_settings_are_one_line(compose_train, override, message):
    from src.builders import instantiate_group

    cfg = compose_train("posthoc_ema.enabled=true", override)
    with pytest.raises(ConfigError, match=message) as err:
        instantiate_group(cfg.callbacks)
    one_line(err)


def test_resuming_a_run_trained_without_post_hoc_ema_is_refused(compose_train):
    base = [*PHEMA[1:], "posthoc_ema.enabled=false"]
    train(compose_train(*base, "trainer.max_steps=2"))
    with pytest.raises(ConfigError) as err:
        train(compose_train(*PHEMA, "trainer.max_steps=3", "ckpt_path=last"))
    assert "trained without it" in one_line(err) and "posthoc_ema.enabled=false" in one_line(err)


def test_a_failed_snapshot_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "phema" / "phema-0000004-0.0500.pt"
    atomic.torch_save({"step": 4}, target)
    real_save = torch.save

    def half_written(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(atomic.torch, "save", half_written)
    with pytest.raises(OSError, match="No space left"):
        atomic.torch_save({"step": 8}, target)
    with pytest.raises(OSError):
        atomic.torch_save({"step": 8}, tmp_path / "phema" / "phema-0000008-0.0500.pt")
    monkeypatch.setattr(atomic.torch, "save", real_save)
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]  # no temp file, no new name
    assert torch.load(target, weights_only=True) == {"step": 4}  # the earlier content intact
