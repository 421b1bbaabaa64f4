"""Every experiment recipe composes and trains one step (data replaced by generated images)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from src.training import train

EXPERIMENTS = sorted(p.stem for p in (Path(__file__).resolve().parents[1] / "conf" / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(root / f"{i}.png")
    return root


def test_every_recipe_is_listed():
    assert {
        "digits_quickstart",
        "cifar10_ddpm",
        "cifar10_ddpm_ablation",
        "cifar10_iddpm",
        "cifar10_iddpm_vlb",
        "celebahq256_ddpm",
        "lsun256_ddpm",
    } <= set(EXPERIMENTS)


def test_the_default_run_is_the_digits_quickstart_recipe(compose_train):
    """`python train.py` with no arguments and `experiment=digits_quickstart` are the same run (README)."""
    from omegaconf import OmegaConf

    default = OmegaConf.to_container(compose_train(fast=False), resolve=True)
    named = OmegaConf.to_container(compose_train("experiment=digits_quickstart", fast=False), resolve=True)
    assert default == named


@pytest.mark.parametrize(
    "overrides,num_classes,guidance_scale",
    [
        ([], 10, 0.0),  # the digits quickstart says it is class-conditional, unguided
        (["model.num_classes=null"], None, 0.0),  # opting out
        # the data picks nothing: other images under the default recipe keep its conditioning (sub-folders are
        # the classes of an image folder) unless the command line opts out
        (["data=image_folder", "data.root=/images"], 10, 0.0),
        (["data=image_folder", "data.root=/images", "model.num_classes=null"], None, 0.0),
        (["experiment=cifar10_ddpm"], None, None),  # the paper's unconditional CIFAR-10 net
        (["experiment=digits_conditional"], 10, 0.0),
    ],
)
def test_the_recipe_states_its_conditioning(compose_train, overrides, num_classes, guidance_scale):
    cfg = compose_train(*overrides, fast=False)
    assert cfg.model.num_classes == num_classes and cfg.guidance_scale == guidance_scale
    assert cfg.callbacks.sample_grid.guidance_scale == guidance_scale


@pytest.mark.slow
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_recipe_trains_one_step(compose_train, image_dir, experiment):
    size = min(compose_train(f"experiment={experiment}", fast=False).data.image_size, 32)
    # The recipe's own net, schedule and objective on generated images, one tiny step (256x256 recipes
    # run their full-width net on 32x32 inputs to keep CPU time down; every level is still visited).
    cfg = compose_train(
        f"experiment={experiment}",
        "data=image_folder",
        f"data.root={image_dir}",
        f"data.image_size={size}",
        f"data.channels={1 if 'digits' in experiment else 3}",
        "data.batch_size=1",
        "data.num_workers=0",
        "data.val_fraction=0.5",
        "trainer.accelerator=cpu",
        "trainer.precision=32-true",
        "+trainer.fast_dev_run=true",
        "callbacks.sample_grid.num_samples=1",
        "sampler.steps=2",
        "callbacks.progress_bar=null",
        fast=False,
    )
    metrics, objects = train(cfg)
    assert np.isfinite(metrics["train/loss"])
    assert objects["module"].diffusion.num_timesteps == cfg.schedule.num_timesteps
    assert objects["module"].net.image_size == size


@pytest.mark.parametrize(
    "experiment,expected",
    [
        (
            "cifar10_ddpm",
            dict(
                lr=2e-4,
                warmup=5000,
                ema=0.9999,
                T=1000,
                schedule="linear",
                loss="simple",
                var="fixed_large",
                batch=128,
                dropout=0.1,
                max_steps=800000,
                clip=1.0,
                flip=True,
            ),
        ),
        (
            "cifar10_iddpm",
            dict(
                lr=1e-4, T=4000, schedule="cosine", loss="hybrid", var="learned_range", batch=128, dropout=0.3, blocks=3
            ),
        ),
        ("cifar10_iddpm_vlb", dict(T=4000, schedule="cosine", loss="vlb", var="learned_range")),
        ("celebahq256_ddpm", dict(lr=2e-5, batch=64, size=256, T=1000, schedule="linear")),
    ],
)
def test_recipe_values_match_the_paper(compose_train, experiment, expected):
    cfg = compose_train(f"experiment={experiment}", fast=False)
    got = dict(
        lr=cfg.module.optimizer.lr,
        warmup=cfg.module.lr_warmup_steps,
        ema=cfg.module.ema_decay,
        T=cfg.schedule.num_timesteps,
        schedule=cfg.schedule.name,
        loss=cfg.objective.loss_type,
        var=cfg.objective.var_type,
        batch=cfg.data.batch_size,
        dropout=cfg.model.dropout,
        max_steps=cfg.trainer.max_steps,
        clip=cfg.trainer.gradient_clip_val,
        flip=cfg.data.random_flip,
        blocks=cfg.model.num_res_blocks,
        size=cfg.data.image_size,
    )
    assert {k: got[k] for k in expected} == expected


def test_ablation_sweeps_the_six_table2_objectives(compose_train):
    cfg = compose_train("experiment=cifar10_ddpm_ablation", fast=False, return_hydra_config=True)
    objectives = cfg.hydra.sweeper.params.objective.split(",")
    rows = set()
    for name in objectives:
        obj = compose_train(f"objective={name}", fast=False).objective
        rows.add((obj.mean_type, obj.var_type, obj.loss_type))
    assert rows == {
        ("mu", "learned_range", "vlb"),
        ("mu", "fixed_large", "vlb"),
        ("mu", "fixed_large", "simple"),
        ("eps", "learned_range", "vlb"),
        ("eps", "fixed_large", "vlb"),
        ("eps", "fixed_large", "simple"),
    }
