"""Bad input stops the run with one line that says what is wrong and how to fix it."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra.errors import MissingConfigException
from PIL import Image

from src.data import DatasetNotFoundError
from src.errors import CheckpointError, ConfigError
from src.training import train

REPO = Path(__file__).resolve().parents[1]
ONE_STEP = [
    "trainer.max_steps=1",
    "callbacks.sample_grid=null",
    "+trainer.limit_val_batches=0",
    "+trainer.num_sanity_val_steps=0",
]


def one_line_error(exc_info, *fragments: str) -> str:
    message = str(exc_info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("group, options", [("model", "unet_small"), ("schedule", "cosine"), ("objective", "hybrid")])
def test_unknown_group_option_lists_the_choices(compose_train, group, options):
    with pytest.raises(MissingConfigException) as err:
        compose_train(f"{group}=nonexistent")
    assert f"Could not find '{group}/nonexistent'" in str(err.value)
    assert f"Available options in '{group}'" in str(err.value) and options in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize(
    "override, fragments",
    [
        (
            "objective.loss_type=l1",
            ["diffusion (objective): unknown loss_type 'l1'; choose one of simple, vlb, hybrid"],
        ),
        (
            "objective.var_type=learned",
            ["unknown var_type 'learned'; choose one of fixed_small, fixed_large, learned_range"],
        ),
        ("schedule.name=quadratic", ["schedule: unknown beta schedule 'quadratic'; choose one of linear, cosine"]),
        (
            "schedule.num_timesteps=10",
            [
                "schedule=linear with schedule.num_timesteps=10 gives betas outside (0, 1)",
                "use a larger schedule.num_timesteps",
            ],
        ),
        (
            "data.image_size=18",
            [
                "data.image_size sets the size",
                "image_size=18 must be divisible by",
                "use an image_size such as 16 or 20",
            ],
        ),
        (
            "+model.out_channels=1",
            ["model.out_channels=1 but objective var_type=learned_range", "remove model.out_channels"],
        ),
        ("callbacks.sample_grid.num_samples=0", ["callbacks.sample_grid: num_samples must be positive, got 0"]),
    ],
)
def test_bad_config_value_is_one_line_config_error(compose_train, override, fragments):
    extra = ["model.channel_mult=[1,2,2]", "model.attention_resolutions=[]"] if "image_size" in override else []
    extra += ["objective=hybrid"] if "out_channels" in override else []
    cfg = compose_train(*ONE_STEP[:1], *extra, override)
    with pytest.raises(ConfigError) as err:
        train(cfg)
    one_line_error(err, *fragments)


@pytest.mark.slow
def test_resume_with_another_config_lists_what_differs(compose_train):
    train(compose_train(*ONE_STEP))
    cfg = compose_train(*ONE_STEP, "schedule.num_timesteps=40", "objective=hybrid", "ckpt_path=last")
    with pytest.raises(ConfigError) as err:
        train(cfg)
    message = one_line_error(
        err,
        "was trained with another config",
        "schedule.num_timesteps: checkpoint 50, config 40",
        "objective.loss_type: checkpoint 'simple', config 'hybrid'",
        "objective.var_type: checkpoint 'fixed_large', config 'learned_range'",
        "resume with the checkpoint's values (",
        "schedule.num_timesteps=50",
        "objective.loss_type=simple",
    )
    assert "timestep_sampler.num_timesteps" not in message  # follows schedule.num_timesteps; not listed twice


@pytest.mark.slow
def test_unreadable_checkpoint_is_one_line_error(compose_train):
    cfg = compose_train(*ONE_STEP, "ckpt_path=last")
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError) as err:
        train(cfg)
    one_line_error(err, f"cannot read checkpoint {last}", "use another one with ckpt_path=<file>")


@pytest.mark.slow
def test_missing_checkpoint_file_is_one_line_error(compose_train, tmp_path):
    with pytest.raises(CheckpointError) as err:
        train(compose_train(*ONE_STEP, f"ckpt_path={tmp_path}/nope.ckpt"))
    one_line_error(err, f"ckpt_path={tmp_path}/nope.ckpt: no such checkpoint file")


def write_images(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")


IMAGE_FOLDER = ["data=image_folder", "data.image_size=16", "data.num_workers=0", "data.pin_memory=false"]


@pytest.mark.slow
def test_empty_image_folder(compose_train, tmp_path):
    (tmp_path / "empty").mkdir()
    cfg = compose_train(*ONE_STEP, *IMAGE_FOLDER, f"data.root={tmp_path}/empty")
    with pytest.raises(DatasetNotFoundError) as err:
        train(cfg)
    one_line_error(err, f"no images found in: {tmp_path}/empty", "set data.root=")


@pytest.mark.slow
@pytest.mark.parametrize("on_bad_image", ["skip", "error"])
# the 20 readable images make one training batch, fewer than the logging interval: Lightning says so
@pytest.mark.filterwarnings(
    r"ignore:The number of training batches \(1\) is smaller than the logging interval"
    ":lightning.fabric.utilities.warnings.PossibleUserWarning"
)
def test_unreadable_images_are_skipped_with_a_count_or_stop_the_run(compose_train, tmp_path, caplog, on_bad_image):
    write_images(tmp_path / "images", 20)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (tmp_path / "images" / "empty.jpg").write_bytes(b"")
    cfg = compose_train(*ONE_STEP, *IMAGE_FOLDER, f"data.root={tmp_path}/images", f"data.on_bad_image={on_bad_image}")
    if on_bad_image == "error":
        with pytest.raises(DatasetNotFoundError) as err:
            train(cfg)
        one_line_error(err, "unreadable image", "2 bad file(s) in total", "set data.on_bad_image=skip")
        return
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 1
    assert "skipping 2 unreadable image(s)" in caplog.text


@pytest.mark.slow
def test_wrong_cifar10_files(compose_train, tmp_path):
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta"]:
        (folder / name).write_bytes(pickle.dumps({"images": [1, 2, 3]}))
    cfg = compose_train(
        *ONE_STEP,
        "data=cifar10",
        f"data.root={tmp_path}/cifar10",
        "data.download=false",
        "data.num_workers=0",
        "data.pin_memory=false",
        "model.attention_resolutions=[16]",
    )
    with pytest.raises(DatasetNotFoundError) as err:
        train(cfg)
    one_line_error(
        err,
        f"CIFAR-10 file {folder}/data_batch_1 is unreadable or not in the CIFAR-10 python format",
        "expected 'data' and 'labels'",
        "replace it with the file from",
    )


@pytest.mark.slow
@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["data.image_size=18", "model.channel_mult=[1,2,2]"], "image_size=18 must be divisible by"),
        (["objective=hybrid", "+model.out_channels=1"], "model.out_channels=1 but objective var_type=learned_range"),
        (["ckpt_path=last"], "ckpt_path=last but"),
    ],
)
def test_train_py_prints_one_error_line_without_traceback(tmp_path, overrides, expected):
    cmd = [sys.executable, "train.py", "trainer.accelerator=cpu", f"hydra.run.dir={tmp_path}/run", *overrides]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], result.stderr[-3000:]
