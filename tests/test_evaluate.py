"""evaluate.py: rebuilding a module from a checkpoint, samples to npz + grid, FID/IS with and without
Inception weights, the NLL report, and one-line errors."""

import json
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from test_fid import write_random_inception_weights

from src.checkpoints import load_module
from src.errors import CheckpointError, ConfigError
from src.evaluation import run
from src.training import train

REPO = Path(__file__).resolve().parents[1]
# an unconditional digits run (the class-conditional digits default is evaluated in test_eval_conditional.py)
TINY_TRAIN = [
    "debug=tiny",
    "model.num_classes=null",
    "trainer.max_steps=2",
    "callbacks.sample_grid=null",
    "sampler=ddpm",
    "sampler.steps=null",
]

# Every test here reads the checkpoint of a training run (`trained`), most run evaluate.py's command on it.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory, compose_config):
    """A 2-step digits run (T=50, tiny U-Net): (checkpoint path, the trained module)."""
    root = tmp_path_factory.mktemp("trained")
    cfg = compose_config("train", *TINY_TRAIN, output_dir=root / "run", data_dir=root / "data")
    _, objects = train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt", objects["module"]


@pytest.fixture
def evaluate(tmp_path, trained, compose_evaluate):
    """evaluate(*overrides) -> (metrics dict, output folder) for the tiny checkpoint."""

    def _evaluate(*overrides: str):
        out = tmp_path / "eval"
        cfg = compose_evaluate(
            f"ckpt_path={trained[0]}", "num_samples=4", "batch_size=4", "isc_splits=2", *overrides, output_dir=out
        )
        return run(cfg), out

    return _evaluate


@pytest.fixture
def offline_torch_hub(tmp_path, monkeypatch):
    """No Inception weights in the torch hub cache and no network to download them."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", mock.Mock(side_effect=OSError("network is unreachable")))


def test_load_module_rebuilds_the_trained_module(trained):
    path, module = trained
    loaded = load_module(path)
    assert not loaded.training
    expected = module.state_dict()
    assert loaded.state_dict().keys() == expected.keys()
    for key, value in loaded.state_dict().items():
        if isinstance(value, torch.Tensor):
            torch.testing.assert_close(value, expected[key].cpu(), msg=key)
        else:  # extra state (the EMA's update count)
            assert value == expected[key], key
    assert loaded.diffusion.num_timesteps == 50 and loaded.ema.num_updates == module.ema.num_updates


def test_bad_checkpoints_fail_with_one_line(tmp_path, trained):
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained[0].read_bytes()[:4096])
    text = tmp_path / "notes.ckpt"
    text.write_text("not a checkpoint")
    foreign = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}}, foreign)
    cases = {
        tmp_path / "missing.ckpt": "checkpoint not found",
        truncated: "cannot read checkpoint",
        text: "cannot read checkpoint",
        foreign: "no run config",
    }
    for path, expected in cases.items():
        with pytest.raises(CheckpointError) as err:
            load_module(path)
        assert expected in str(err.value) and str(path) in str(err.value) and "\n" not in str(err.value)


def test_without_inception_weights_samples_are_written_and_fid_is_null(evaluate, offline_torch_hub):
    metrics, out = evaluate("sampler=ddim", "steps=5")
    assert metrics["fid"] is None and metrics["is"] is None and metrics["kid"] is None
    why = metrics["metrics_unavailable"]["all"]
    assert "Inception weights" in why and "network is unreachable" in why
    assert metrics["samples"]["sampler"] == {
        "sampler": "ddim",
        "steps": 5,
        "spacing": None,
        "eta": 0.0,
        "clip_denoised": True,
    }
    with np.load(out / "samples_4x16x16x1.npz") as data:
        assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (4, 16, 16, 1)
    assert (out / "samples_grid.png").stat().st_size > 0
    assert json.loads((out / "metrics.json").read_text()) == metrics


def test_fid_is_and_nll_report(evaluate, tmp_path):
    weights = write_random_inception_weights(tmp_path / "random-inception.pth")
    metrics, out = evaluate(
        f"feature_extractor_weights_path={weights}",
        "num_reference_images=6",
        "nll=true",
        "nll_num_images=3",
        "nll_batch_size=2",
        "metrics=[fid,is,kid,prc]",
        "rate_distortion=true",
    )
    # the checkpoint's own sampler: DDPM over all T=50 steps
    assert metrics["samples"]["sampler"]["sampler"] == "ddpm" and metrics["samples"]["sampler"]["steps"] is None
    assert metrics["fid"] > 0 and metrics["is"] >= 1.0 and metrics["reference"]["num_images"] == 6
    assert metrics["reference"]["spec"] == "train" and metrics["extractor"]["name"] == "inception-v3-compat"
    assert metrics["kid_subset_size"] == 4 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    protocol = metrics["protocol"]
    assert protocol["seeds"] == [0] and protocol["weights"] == "ema" and len(protocol["checkpoint_sha256_prefix"]) == 16
    assert (
        protocol["extractor"] == "inception-v3-compat"
        and protocol["steps"] == 50
        and "not comparable" in protocol["notes"][0]
    )
    nll = metrics["nll"]
    assert nll["num_images"] == 3 and nll["num_timesteps"] == 50 and nll["split"] == "val"
    assert nll["conditioning"] == "unconditional model"
    # the parts add up to the bound, L_T + (L_1 .. L_{T-1}) + L_0, up to float32 round-off
    assert nll["bpd"] == pytest.approx(nll["prior_bpd"] + nll["kl_bpd"] + nll["decoder_bpd"], rel=1e-6)
    assert sum(b["bpd"] for b in nll["vb_by_t"]) == pytest.approx(nll["kl_bpd"] + nll["decoder_bpd"], rel=1e-6)
    with np.load(out / "nll_terms.npz") as terms:
        assert terms["vb"].shape == (50,) and terms["total_bpd"].shape == (3,)
    # DDPM Fig. 5 and the per-t bound terms, from the same pass
    assert nll["figures"] == {
        "bound_terms": str(out / "bound_terms.png"),
        "rate_distortion": str(out / "rate_distortion.png"),
    }
    curve = json.loads((out / "rate_distortion.json").read_text())
    assert len(curve["rate_bpd"]) == 50 and curve["lossless_bpd"] == pytest.approx(nll["bpd"], rel=1e-6)


def test_train_config_values_on_the_command_line_are_reported_and_the_checkpoint_wins(evaluate, caplog):
    metrics, _ = evaluate(
        "fid=false",
        "sampler=ddim",
        "steps=2",
        "+model.base_channels=64",
        "+schedule.num_timesteps=1000",
        "+model.dropout=0.0",
        "+data.batch_size=2",
    )
    # the tiny checkpoint (T=50, ch 32) was sampled, not a net built from the command line
    assert metrics["diffusion"]["num_timesteps"] == 50
    ignored = metrics["config_vs_command_line"]["ignored"]
    assert ignored == {
        "model.base_channels": {"checkpoint": 32, "command_line": 64},
        "schedule.num_timesteps": {"checkpoint": 50, "command_line": 1000},
    }  # dropout 0.0 matches
    assert metrics["config_vs_command_line"]["data_overrides"] == {
        "data.batch_size": {"checkpoint": 16, "command_line": 2}
    }
    assert (
        "ignoring command-line values that differ from it: model.base_channels: checkpoint 32, command line 64; "
        "schedule.num_timesteps: checkpoint 50, command line 1000" in caplog.text
    )


@pytest.mark.parametrize(
    "override,message",
    [
        ("num_samples=0", "num_samples must be a positive integer"),
        ("nll_batches=-1", "nll_batches must be a positive integer"),
        ("compile=fast", "compile must be false, true or one of"),
    ],
)
def test_bad_settings_are_config_errors(evaluate, override, message):
    with pytest.raises(ConfigError, match=message):
        evaluate(override)


def test_cli_reports_bad_inputs_in_one_line(tmp_path, trained):
    for args, expected in [
        ([f"ckpt_path={tmp_path}/missing.ckpt"], "checkpoint not found"),
        ([f"ckpt_path={trained[0]}", "num_samples=0"], "num_samples must be a positive integer"),
    ]:
        result = subprocess.run(
            [sys.executable, "evaluate.py", *args, f"hydra.run.dir={tmp_path}/out"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 2, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and expected in errors[0] and "Traceback" not in result.stderr


def test_seeds_give_disjoint_sample_sets_and_their_summary(evaluate):
    metrics, out = evaluate(
        "extractor=digits", "seeds=[0,1]", "sampler=ddim", "steps=3", "reference=val", "kid_subset_size=4"
    )
    runs = metrics["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    assert [r["samples"]["image_seeds"] for r in runs] == [[0, 3], [4, 7]]
    sets = []
    for seed in (0, 1):
        with np.load(out / f"seed{seed}" / "samples_4x16x16x1.npz") as data:
            sets.append(data["arr_0"])
    assert not any((a == b).all() for a in sets[0] for b in sets[1])
    fd = "fd_digits-mlp64"
    assert metrics["summary"][fd]["values"] == [r[fd] for r in runs]
    assert metrics["summary"][fd]["min"] == min(r[fd] for r in runs)
    assert metrics["summary"][fd]["mean"] == pytest.approx(np.mean([r[fd] for r in runs]))
    assert {"kid_digits-mlp64", "precision_digits-mlp64", "is_digits-mlp64"} <= metrics["summary"].keys()
    assert "fid" not in metrics and all("fid" not in r for r in runs)
    assert metrics["protocol"]["image_seeds"] == {"0": [0, 3], "1": [4, 7]}


def test_an_interrupted_evaluation_is_marked_partial(evaluate, tmp_path):
    with mock.patch("src.evaluation.run.nll_report", side_effect=KeyboardInterrupt):
        with pytest.raises(KeyboardInterrupt):
            evaluate("fid=false", "sampler=ddim", "steps=2", "nll=true")
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["partial"] is True and written["missing"] == ["nll"] and written["stopped_by"] == "SIGINT (Ctrl+C)"
    assert written["samples"]["num_samples"] == 4  # what was done is kept
    assert not list((tmp_path / "eval").glob("*.tmp"))


def test_samples_file_against_the_checkpoints_validation_split(tmp_path, trained, compose_evaluate):
    from src.metrics.digits_judge import judge_split

    path = tmp_path / "real.npz"
    np.savez(path, arr_0=judge_split(16).held_out.permute(0, 2, 3, 1).numpy())
    metrics = run(
        compose_evaluate(
            f"samples={path}",
            f"ckpt_path={trained[0]}",
            "reference=val",
            "extractor=digits",
            output_dir=tmp_path / "eval",
        )
    )
    assert metrics["reference"]["dataset"] == "digits" and metrics["reference"]["split"] == "val"
    assert metrics["reference"]["num_images"] == 180
    assert metrics["precision_digits-mlp64"] >= 0.7 and metrics["recall_digits-mlp64"] >= 0.7


def test_sample_batches_use_the_weights_asked_for():
    from src.diffusion import SamplerOptions
    from src.sampling.batches import sample_uint8_batches

    class Recorder:
        device = torch.device("cpu")
        seen = []

        def sample(self, n, options, guidance, generator=None, use_ema=True, progress=False):
            self.seen.append(use_ema)
            return torch.zeros(n, 1, 2, 2)

    module = Recorder()
    for use_ema in (True, False):
        list(sample_uint8_batches(module, 3, 2, SamplerOptions("ddim", steps=2), use_ema=use_ema))
    assert module.seen == [True, True, False, False]


def test_the_figures_and_numbers_go_to_tensorboard_at_the_checkpoints_step(evaluate):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    metrics, out = evaluate(
        "logger=tensorboard", "fid=false", "nll=true", "nll_num_images=2", "nll_batch_size=2", "rate_distortion=true"
    )
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert {"eval/rate_distortion", "eval/bound_terms", "eval/samples_grid"} <= set(events.Tags()["images"])
    assert "eval/nll/bpd" in events.Tags()["scalars"]
    (bpd,) = events.Scalars("eval/nll/bpd")
    assert bpd.value == pytest.approx(metrics["nll"]["bpd"], rel=1e-6) and bpd.step == metrics["global_step"] == 2


def test_use_ema_false_is_an_evaluate_option_and_samples_the_trained_weights(evaluate):
    metrics, _ = evaluate("use_ema=false", "fid=false")
    assert metrics["weights"] == "raw" and metrics["protocol"]["weights"] == "raw"
