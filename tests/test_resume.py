"""Resume: a run stopped and resumed matches the uninterrupted run bit for bit (CPU, deterministic)."""

import csv
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException

from src.errors import CheckpointError
from src.lit import DiffusionModule
from src.training import resolve_ckpt_path, train

REPO = Path(__file__).resolve().parents[1]

# Epochs of 4 batches, checkpoints every 4 steps, the stop after step 4: an epoch boundary (the
# parametrized test also stops inside an epoch of 101 batches, which the DataLoader's state resumes).
# Validation runs at steps 3 and 6 (EXACT), or at the checkpoint step (see the parametrized test).
# A sample grid is written at the checkpoint step: it uses its own generator and must not matter.
EPOCHS_OF_4 = "+trainer.limit_train_batches=4"
EXACT_BASE = [
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "+trainer.limit_val_batches=2",
    "callbacks.model_checkpoint.every_n_train_steps=4",
    "callbacks.sample_grid.every_n_steps=4",
    "sampler.steps=10",
]
EXACT = [*EXACT_BASE, EPOCHS_OF_4, "trainer.val_check_interval=3"]


def csv_rows(run_dir: Path) -> list[dict]:
    """metrics.csv without the wall-clock throughput column."""
    with open(run_dir / "csv" / "metrics.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k != "train/images_per_sec"} for row in csv.DictReader(f)]


def assert_identical(a, b, where: str = "checkpoint") -> None:
    """Bit-identical nested checkpoint contents (tensors with torch.equal, everything else with ==)."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), f"{where} differs"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys differ"
        for key in a:
            assert_identical(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(uninterrupted: Path, resumed: Path) -> None:
    rows_a, rows_b = csv_rows(uninterrupted), csv_rows(resumed)
    losses = [r["train/loss"] for r in rows_a if r.get("train/loss")]
    assert len(losses) == 8 and [r["train/loss"] for r in rows_b if r.get("train/loss")] == losses
    assert rows_b == rows_a  # steps, epochs, learning rates and validation too: no step repeated or skipped
    a = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 8
    assert_identical(a["state_dict"], b["state_dict"], "state_dict")  # net, EMA net, EMA count, sampler history
    assert_identical(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert_identical(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert_identical(a["rng_states"]["torch"], b["rng_states"]["torch"], "rng_states.torch")


@pytest.mark.slow
@pytest.mark.parametrize(
    "epochs,val_check_interval",
    [(EPOCHS_OF_4, 3), (EPOCHS_OF_4, 4), (None, 3)],
    ids=["validation-off-the-checkpoint-step", "validation-at-the-checkpoint-step", "stop-inside-an-epoch"],
)
def test_stop_and_resume_matches_uninterrupted_run(compose_train, tmp_path, epochs, val_check_interval):
    # With validation due at the checkpoint step (as in the default config: 500 and 500), Lightning counts
    # that validation as done on resume by creating, not running, the validation DataLoader's iterator;
    # the loader has its own generator so that this draws nothing from the global RNG. Stopped inside an
    # epoch, the training DataLoader's state (epoch, batches handed out) puts the resumed run at the
    # same place in the same shuffle.
    exact = [*EXACT_BASE, *([epochs] if epochs else []), f"trainer.val_check_interval={val_check_interval}"]
    uninterrupted = compose_train(*exact, "trainer.max_steps=8")
    train(uninterrupted)
    first_half = compose_train(*exact, "trainer.max_steps=4")
    first_half.paths.output_dir = str(tmp_path / "resumed")
    train(first_half)
    second_half = compose_train(*exact, "trainer.max_steps=8", "ckpt_path=last")
    second_half.paths.output_dir = str(tmp_path / "resumed")
    _, objects = train(second_half)
    assert objects["trainer"].global_step == 8
    assert objects["module"].ema.num_updates == 8
    assert_same_run(Path(uninterrupted.paths.output_dir), tmp_path / "resumed")


@pytest.mark.slow
def test_sigterm_and_resume_matches_uninterrupted_run_with_importance_sampling(compose_train, tmp_path, monkeypatch):
    # L_vlb with importance-sampled t: with one stored loss per t and 4 x 32 draws over T=25 the sampler
    # is warmed up when the run is stopped, so the resumed steps draw t from the restored history.
    vlb = [
        *EXACT,
        "objective=vlb",
        "schedule.num_timesteps=25",
        "objective.timestep_sampler.history_per_term=1",
        "data.batch_size=32",
        "trainer.max_steps=8",
    ]
    uninterrupted = compose_train(*vlb)
    train(uninterrupted)

    stopped = compose_train(*vlb)
    stopped.paths.output_dir = str(tmp_path / "resumed")
    training_step = DiffusionModule.training_step

    def sigterm_during_step_4(self, batch, batch_idx):
        if self.global_step == 3:
            os.kill(os.getpid(), signal.SIGTERM)  # Lightning's handler only sets a flag
        return training_step(self, batch, batch_idx)

    monkeypatch.setattr(DiffusionModule, "training_step", sigterm_during_step_4)
    with pytest.raises(SIGTERMException):
        train(stopped)
    monkeypatch.setattr(DiffusionModule, "training_step", training_step)
    saved = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4
    history = saved["state_dict"]["timestep_sampler._extra_state"]
    assert bool((history["counts"] == 1).all()), "the sampler should be warmed up at the stop"

    resumed = compose_train(*vlb, "resume=true")
    resumed.paths.output_dir = str(tmp_path / "resumed")
    _, objects = train(resumed)
    assert objects["module"].timestep_sampler.warmed_up
    assert_same_run(Path(uninterrupted.paths.output_dir), tmp_path / "resumed")


@pytest.mark.slow
def test_last_checkpoint_holds_the_final_step_between_periodic_saves(compose_train):
    cfg = compose_train(
        "trainer.max_steps=3",
        "callbacks.model_checkpoint.every_n_train_steps=2",
        "callbacks.sample_grid=null",
        "+trainer.limit_val_batches=0",
    )
    train(cfg)
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=False)["global_step"] == 3  # not 2, the last periodic save


@pytest.mark.slow
def test_ckpt_path_last_without_checkpoint_is_an_error(compose_train):
    cfg = compose_train("ckpt_path=last")
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    message = str(err.value)
    assert "\n" not in message
    assert f"{cfg.paths.output_dir}/checkpoints/last.ckpt does not exist" in message
    assert "hydra.run.dir=<run folder> ckpt_path=last" in message


def test_resume_true_without_checkpoint_says_it_starts_at_step_0(compose_train, caplog):
    cfg = compose_train("resume=true")
    with caplog.at_level(logging.WARNING, logger="src.training"):
        assert resolve_ckpt_path(cfg) is None
    assert "STARTING A NEW RUN FROM STEP 0" in caplog.text and "last.ckpt" in caplog.text


def test_resume_true_finds_last_checkpoint(compose_train):
    cfg = compose_train("resume=true")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"")
    assert resolve_ckpt_path(cfg) == last


@pytest.mark.slow
@pytest.mark.parametrize(
    "signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=["SIGTERM", "SIGUSR1", "Ctrl+C"]
)
def test_stop_signal_to_train_py_saves_and_ckpt_path_last_resumes(tmp_path, signum):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "trainer.accelerator=cpu",
        "schedule.num_timesteps=50",
        "model.base_channels=32",
        "model.channel_mult=[1,2]",
        "model.num_res_blocks=1",
        "model.num_heads=1",
        "data.batch_size=16",
        "callbacks.sample_grid=null",
        "callbacks.progress_bar=null",
        "trainer.val_check_interval=100000",
        "callbacks.model_checkpoint.every_n_train_steps=5",
        f"hydra.run.dir={run_dir}",
        f"paths.data_dir={tmp_path}/data",
    ]
    last = run_dir / "checkpoints" / "last.ckpt"
    # A shell starts background jobs with SIGINT ignored and Python keeps that; the child takes Ctrl+C as
    # a terminal would deliver it, whatever way the tests themselves were started.
    proc = subprocess.Popen(
        [*cmd, "trainer.max_steps=100000"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        deadline = time.monotonic() + 240
        while not last.exists():  # training has run at least 5 steps
            assert proc.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.5)
        proc.send_signal(signum)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr
    assert f"resume with: python train.py hydra.run.dir={run_dir} ckpt_path=last" in stderr
    step = torch.load(last, weights_only=False)["global_step"]
    assert step > 0

    resumed = subprocess.run(
        [*cmd, f"trainer.max_steps={step + 2}", "ckpt_path=last"], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {last} (step {step})" in resumed.stdout + resumed.stderr
    assert torch.load(last, weights_only=False)["global_step"] == step + 2
