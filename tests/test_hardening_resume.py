"""Resume from the checkpoint a run leaves when it reaches max_steps, and stop signals during callback sampling."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_resume import REPO, assert_same_run

from src.errors import ConfigError
from src.training import train

# No periodic save at the stop (every 500 steps) and no epoch end near it (epochs of 101 batches): the only
# checkpoint at step 4 is the one written because max_steps was reached inside an epoch.
INSIDE_AN_EPOCH = [
    "trainer.deterministic=true",
    "trainer.log_every_n_steps=1",
    "+trainer.limit_val_batches=2",
    "trainer.val_check_interval=3",
    "callbacks.model_checkpoint.every_n_train_steps=500",
    "callbacks.sample_grid.every_n_steps=500",
    "callbacks.sample_grid.on_train_end=false",
]


@pytest.mark.slow
def test_the_checkpoint_at_max_steps_resumes_exactly(compose_train, tmp_path):
    train(compose_train(*INSIDE_AN_EPOCH, "trainer.max_steps=8"))
    resumed = tmp_path / "resumed"
    train(compose_train(*INSIDE_AN_EPOCH, "trainer.max_steps=4", output_dir=resumed))
    saved = torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 4 and saved["epoch"] == 0  # still inside the first epoch
    _, objects = train(compose_train(*INSIDE_AN_EPOCH, "trainer.max_steps=8", "ckpt_path=last", output_dir=resumed))
    assert objects["trainer"].global_step == 8
    assert_same_run(tmp_path / "run", resumed)


@pytest.mark.slow
@pytest.mark.parametrize("max_steps", [2, 3])
def test_resuming_with_no_steps_left_says_so(compose_train, tmp_path, max_steps):
    cfg = compose_train("trainer.max_steps=3", "callbacks.sample_grid=null", "+trainer.limit_val_batches=0")
    train(cfg)
    before = {p: p.stat().st_mtime_ns for p in Path(cfg.paths.output_dir).rglob("*")}
    with pytest.raises(ConfigError) as err:
        train(compose_train(f"trainer.max_steps={max_steps}", "ckpt_path=last"))
    message = str(err.value)
    assert "\n" not in message and "already at step 3" in message and "trainer.max_steps greater than 3" in message
    assert {p: p.stat().st_mtime_ns for p in Path(cfg.paths.output_dir).rglob("*")} == before


def test_interruptible_sampling_raises_at_the_signal_and_restores_the_handler():
    from types import SimpleNamespace

    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from src.callbacks.preemption import interruptible_batches

    flagged = []
    trainer = SimpleNamespace(received_sigterm=False)

    def lightning_handler(signum, frame):
        flagged.append(signum)

    def slow_sampler():
        os.kill(os.getpid(), signal.SIGTERM)
        yield from (time.sleep(0.01) for _ in range(500))  # 5 s of "sampler steps" unless stopped

    previous = signal.signal(signal.SIGTERM, lightning_handler)
    try:
        started = time.monotonic()
        with pytest.raises(SIGTERMException):
            list(interruptible_batches(trainer, slow_sampler()))
        assert time.monotonic() - started < 1 and flagged == [signal.SIGTERM]  # Lightning's handler still ran
        assert signal.getsignal(signal.SIGTERM) is lightning_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_during_the_final_grid_stops_it_at_once_and_exits_143(tmp_path, stop):
    # A tiny net, but a final grid of 1024 images over all 1000 steps: minutes on a CPU unless stopped. Without
    # the stop the grid completes and the process exits 0.
    cmd = [
        sys.executable,
        "train.py",
        f"hydra.run.dir={tmp_path}/run",
        "trainer.max_steps=2",
        "trainer.val_check_interval=2",
        "trainer.log_every_n_steps=1",
        "model.base_channels=8",
        "model.channel_mult=[1]",
        "model.num_res_blocks=1",
        "model.attention_resolutions=[]",
        "data.batch_size=8",
        "sampler=ddpm",
        "sampler.steps=null",
        "callbacks.sample_grid.num_samples=1024",
        "callbacks.progress_bar=null",
    ]
    # A job started in the background of a shell inherits SIGINT ignored, and Python then installs no Ctrl+C
    # handler: give the run the default disposition, as in a terminal.
    process = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in process.stdout:  # the final checkpoint is written just before the final grid starts
        lines.append(line)
        if "training finished at step 2" in line:
            break
    time.sleep(1.0)
    stopped = time.monotonic()
    process.send_signal(stop)
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 143, "".join(lines) + rest
    assert time.monotonic() - stopped < 60  # within a few sampler steps (slower on a loaded machine)
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 2
    assert not (tmp_path / "run" / "samples" / "step_0000002.png").exists()
