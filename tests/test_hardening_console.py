"""What the console says: one-line errors for bad sizes, and no warnings or adverts a user cannot act on."""

import pytest
from hydra.utils import instantiate

from src.errors import ConfigError


def test_a_batch_larger_than_the_training_split_names_the_key_and_the_split(compose_train):
    datamodule = instantiate(compose_train("data.batch_size=100000").data)
    datamodule.setup("fit")
    with pytest.raises(ConfigError) as err:
        datamodule.train_dataloader()
    size = len(datamodule.train_dataset)
    assert str(err.value) == (
        f"data.batch_size=100000 is larger than the training split ({size} images); "
        f"set data.batch_size to at most {size}"
    )


def test_image_folder_workers_are_capped_at_the_cpu_count(compose_train, monkeypatch, caplog):
    import logging
    import os

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    with caplog.at_level(logging.INFO, logger="src.data.base"):
        datamodule = instantiate(compose_train("data.num_workers=4").data)
    assert datamodule.num_workers == 2
    assert "data.num_workers=4 lowered to 2, the CPU cores this process may use" in caplog.text


def test_no_lightning_advert_and_no_wandb_anonymous_setting(tmp_path, caplog):
    import logging

    import lightning as L
    from omegaconf import OmegaConf

    from src.loggers import build_loggers
    from src.training import _quiet_lightning_adverts

    _quiet_lightning_adverts()
    with caplog.at_level(logging.INFO):
        L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    assert "Tip:" not in caplog.text and "GPU available" in caplog.text  # only the advert is dropped
    (wandb_logger,) = build_loggers(
        OmegaConf.create(
            {
                "wandb": {
                    "_target_": "lightning.pytorch.loggers.WandbLogger",
                    "project": "p",
                    "save_dir": str(tmp_path),
                    "offline": True,
                }
            }
        )
    )
    assert "anonymous" not in wandb_logger._wandb_init  # what wandb.init receives


@pytest.mark.parametrize("flops", [0, 1234])
def test_the_model_summary_reports_flops_only_when_counted(caplog, flops):
    import logging

    from src.callbacks import ModelSummary

    columns = [(" ", ["0"]), ("Name", ["net"]), ("Type", ["UNet"]), ("Params", ["1.1 M"]), ("FLOPs", [str(flops)])]
    with caplog.at_level(logging.INFO):
        ModelSummary.summarize(columns, 1_100_000, 1_100_000, 4.4, {"train": 1, "eval": 0}, flops)
    assert "Total params" in caplog.text and "UNet" in caplog.text
    assert ("Total Flops" in caplog.text) == bool(flops) and ("FLOPs" in caplog.text) == bool(flops)


def test_the_classifier_schedule_mismatch_names_the_diffusion_models_schedule(monkeypatch):
    from types import SimpleNamespace

    from omegaconf import OmegaConf

    import src.sampling.conditioning as guidance
    from src.diffusion import GaussianDiffusion, make_beta_schedule

    classifier = SimpleNamespace(
        diffusion=GaussianDiffusion(make_beta_schedule("cosine", 100)),
        ema=SimpleNamespace(model=SimpleNamespace(image_shape=(1, 16, 16))),
    )
    monkeypatch.setattr(guidance, "read_checkpoint", lambda path: {})
    monkeypatch.setattr(guidance, "module_from_checkpoint", lambda ckpt, task, source: classifier)
    monkeypatch.setattr(guidance, "run_config", lambda ckpt: OmegaConf.create({"schedule": {"name": "cosine"}}))
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 100))
    with pytest.raises(ConfigError) as err:
        guidance.load_classifier("classifier.ckpt", diffusion, (1, 16, 16), "cpu")
    betas = diffusion.betas
    assert f"the diffusion model's T=100, betas {float(betas[0]):.4g}..{float(betas[-1]):.4g}" in str(err.value)


# --- the default model fits any image size ---------------------------------------------------------------
def _default_net(compose_train, *overrides):
    from src.builders import build_task_module

    cfg = compose_train(*overrides, fast=False)
    datamodule = instantiate(cfg.data)
    return cfg, build_task_module(cfg, datamodule).net


def test_the_default_digits_net_is_unchanged(compose_train):
    from src.models import UNet

    cfg, net = _default_net(compose_train)
    assert list(cfg.model.attention_resolutions) == [8]
    # The network of the same config with attention pinned at 8x8, as it was written before: same names, shapes
    # and count (checkpoints carry their own model config, so older ones load with theirs); class-conditional on
    # the 10 digits (conf/labels/digits.yaml), so with a label embedding of 10 + the null label.
    assert cfg.model.num_classes == 10 and cfg.guidance_scale == 0.0
    before = UNet(
        in_channels=1,
        out_channels=1,
        image_size=16,
        base_channels=32,
        channel_mult=[1, 2, 2],
        num_res_blocks=cfg.model.num_res_blocks,
        attention_resolutions=[8],
        dropout=0.0,
        num_heads=4,
        num_classes=10,
    )
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in before.state_dict().items()}
    assert sum(p.numel() for p in net.parameters()) == sum(p.numel() for p in before.parameters())
    net.load_state_dict(before.state_dict())


def _write_pngs(folder, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")


@pytest.mark.parametrize("image_size", [32, 64])
def test_the_default_net_fits_an_image_folder_of_any_size(compose_train, tmp_path, image_size):
    _write_pngs(tmp_path / "images", 4, 40)
    cfg, net = _default_net(
        compose_train, "data=image_folder", f"data.root={tmp_path / 'images'}", f"data.image_size={image_size}"
    )
    assert list(cfg.model.attention_resolutions) == [image_size // 2]
    import torch

    out = net(torch.zeros(1, 3, image_size, image_size), torch.zeros(1, dtype=torch.long))
    assert out.shape == (1, 3, image_size, image_size)


@pytest.mark.slow
def test_an_empty_image_folder_is_reported_as_such(compose_train, tmp_path):
    from src.data import DatasetNotFoundError
    from src.training import train

    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="no images found in"):
        train(
            compose_train(
                "data=image_folder",
                f"data.root={tmp_path / 'empty'}",
                "data.image_size=64",
                "trainer.max_steps=1",
                fast=False,
            )
        )


def test_resuming_a_run_whose_attention_sat_elsewhere_names_the_value(compose_train):
    # A data=cifar10 run of the default model trained before attention followed the image size had it at 8x8;
    # the config now puts it at 16x16. Resuming must say so (and how to keep 8), not fail loading the weights.
    from pathlib import Path

    from omegaconf import OmegaConf

    from src.training import check_resume_compatible

    cfg = compose_train("data=cifar10", fast=False)
    trained = OmegaConf.to_container(cfg, resolve=True)
    trained["model"]["attention_resolutions"] = [8]
    with pytest.raises(ConfigError, match=r"model.attention_resolutions: checkpoint \[8\], config \[16\]"):
        check_resume_compatible(trained, cfg, Path("last.ckpt"))
    trained["model"]["attention_resolutions"] = [16]
    check_resume_compatible(trained, cfg, Path("last.ckpt"))
