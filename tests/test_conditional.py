"""Class-conditional training and sampling end to end: the label-conditioned U-Net, label dropout in the
training step, the noisy-image classifier (task=classifier), and sample.py / evaluate.py with guidance."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from src.diffusion import GaussianDiffusion, UniformSampler, make_beta_schedule
from src.errors import CheckpointError, ConfigError
from src.lit import DiffusionModule
from src.models import NoisyClassifier, UNet
from src.sampling.conditioning import check_guidance, per_class_rows
from src.training import train

# The tiny T=50 net of conf/debug/tiny.yaml on 8x8 digits, for runs of one step.
TINY = [
    "debug=tiny",
    "data.image_size=8",
    "trainer.max_steps=1",
    "trainer.val_check_interval=1",
    "+trainer.limit_val_batches=1",
    "+trainer.num_sanity_val_steps=0",
]


pytestmark = pytest.mark.usefixtures("single_thread")


def perturbed(net: nn.Module) -> nn.Module:
    """The net with its zero-initialised layers made non-zero, so every input reaches the output."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return net.eval()


def test_unet_output_depends_on_the_label_and_the_null_label():
    net = perturbed(UNet(1, 1, 8, 32, [1, 2], 1, [], num_classes=3))
    x, t = torch.randn(1, 1, 8, 8).expand(4, -1, -1, -1), torch.full((4,), 7)
    with torch.no_grad():
        out = net(x, t, y=torch.tensor([0, 1, 2, 3]))  # 3 = null
        unconditional = net(x, t)
    for i in range(4):
        for j in range(i + 1, 4):
            assert (out[i] - out[j]).abs().max() > 1e-3, (i, j)
    torch.testing.assert_close(unconditional, out[3:].expand(4, -1, -1, -1))  # y=None is the null label


def test_noisy_classifier_shapes_and_uniform_start():
    net = NoisyClassifier(3, 16, 5, 32, [1, 2], 1, [8])
    logits = net(torch.randn(2, 3, 16, 16), torch.tensor([0, 999]))
    assert logits.shape == (2, 5)
    assert torch.equal(logits, torch.zeros(2, 5))  # zero head: every class equally likely at first
    with pytest.raises(ValueError, match="num_classes must be >= 1"):
        NoisyClassifier(3, 16, 0, 32, [1, 2], 1, [8])


class LabelSpy(nn.Module):
    """A stand-in net recording the labels it is trained with."""

    def __init__(self, num_classes):
        super().__init__()
        self.num_classes, self.seen = num_classes, []
        self.scale = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        self.seen.append(y)
        return x * self.scale


@pytest.mark.parametrize("p", [0.1, 0.3])
def test_training_step_drops_labels_at_the_configured_rate(p):
    spy = LabelSpy(num_classes=10)
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 50))
    module = DiffusionModule(
        spy, diffusion, UniformSampler(50), torch.optim.Adam, lr_warmup_steps=0, ema_decay=0.9999, label_dropout=p
    )
    n = 20_000
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached
        module.training_step((torch.zeros(n, 1, 2, 2), y), 0)
    seen = spy.seen[-1]
    dropped = (seen == 10).sum().item()
    assert abs(dropped - n * p) <= 5 * math.sqrt(n * p * (1 - p))
    assert torch.equal(seen[seen != 10], y[seen != 10])
    # validation (with the EMA copy of the net) conditions on every label
    with pytest.warns(UserWarning, match="self.log"):  # no Trainer attached
        module.validation_step((torch.zeros(8, 1, 2, 2), y[:8]), 0)
    assert torch.equal(module.ema.model.seen[-1], y[:8])


def test_unconditional_net_gets_no_labels():
    calls = []
    diffusion = GaussianDiffusion(make_beta_schedule("linear", 50))
    module = DiffusionModule(
        lambda_net(calls),
        diffusion,
        UniformSampler(50),
        torch.optim.Adam,
        lr_warmup_steps=0,
        ema_decay=0.9999,
        label_dropout=0.5,
    )
    with pytest.warns(UserWarning, match="self.log"):
        module.training_step((torch.zeros(4, 1, 2, 2), torch.arange(4)), 0)
    assert calls == [{}]


def lambda_net(calls):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.zeros(()))

        def forward(self, x, t, **kwargs):
            calls.append(kwargs)
            return x * self.scale

    return Net()


def test_per_class_rows_and_guidance_checks():
    images = torch.arange(6, dtype=torch.uint8).view(6, 1, 1, 1)
    rows = per_class_rows(images, torch.tensor([1, 0, 1, 1, 0, 2]), 3, 2)
    assert rows.flatten().tolist() == [1, 4, 0, 2, 5, 0]  # class 0: 1, 4; class 1: 0, 2; class 2: 5, blank
    with pytest.raises(ConfigError, match="needs a class-conditional checkpoint"):
        check_guidance(None, [0.0, 3.0], classifier=False)
    with pytest.raises(ConfigError, match="use 0..9"):
        check_guidance(10, [0.0], classifier=False, class_label=10)
    check_guidance(None, [0.0], classifier=True, class_label=3)  # classifier guidance of an unconditional model


@pytest.mark.slow
def test_model_num_classes_below_the_data_classes_is_a_config_error(compose_train):
    cfg = compose_train("model.num_classes=5", "+trainer.fast_dev_run=true")
    with pytest.raises(ConfigError, match="model.num_classes=5 but the data has 10 classes.*set model.num_classes=10"):
        train(cfg)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (
            ["model.num_classes=null", "guidance_scale=2"],
            r"guidance_scale=2 needs a class-conditional net: set model.num_classes",
        ),
        (
            ["guidance_scale=2", "module.label_dropout=0"],
            r"module.label_dropout=0 never trains: set module.label_dropout=0.1",
        ),
        (["guidance_scale=high"], r"guidance_scale must be a number or null, got 'high'"),
    ],
)
def test_a_guidance_scale_the_run_cannot_use_is_a_config_error(compose_train, overrides, match):
    from src.builders import check_guidance_scale

    check_guidance_scale(compose_train(fast=False))  # the digits default: conditional, w = 0
    check_guidance_scale(compose_train("guidance_scale=2", fast=False))
    with pytest.raises(ConfigError, match=match):
        check_guidance_scale(compose_train(*overrides, fast=False))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, compose_config):
    """One-step runs on digits, T=50: a class-conditional denoiser and a noisy-image classifier."""
    root = tmp_path_factory.mktemp("conditional")
    cfg = compose_config(
        "train",
        "experiment=digits_conditional",
        *TINY,
        "callbacks.sample_grid.num_samples=2",
        "sampler.steps=2",
        output_dir=root / "diffusion",
        data_dir=root / "data",
    )
    _, diffusion_objects = train(cfg)
    cfg = compose_config("train", "task=classifier", *TINY, output_dir=root / "classifier", data_dir=root / "data")
    metrics, classifier_objects = train(cfg)
    return {
        "diffusion": root / "diffusion" / "checkpoints" / "last.ckpt",
        "classifier": root / "classifier" / "checkpoints" / "last.ckpt",
        "diffusion_module": diffusion_objects["module"],
        "classifier_module": classifier_objects["module"],
        "classifier_metrics": metrics,
    }


@pytest.mark.slow
def test_conditional_digits_and_classifier_train_through_the_config(checkpoints):
    net = checkpoints["diffusion_module"].net
    assert (
        isinstance(net, UNet) and net.num_classes == 10 and checkpoints["diffusion_module"].hparams.label_dropout == 0.1
    )
    # the training grid of a class-conditional net: one row per class (2 images asked for, so 1 per class)
    raw = checkpoints["diffusion"].parents[1] / "samples" / "raw" / "step_0000001.png"
    assert read_png(raw).shape[:2] == (2 + 10 * 10, 2 + 1 * 10)
    classifier = checkpoints["classifier_module"]
    assert isinstance(classifier.net, NoisyClassifier) and classifier.net.num_classes == 10
    assert classifier.global_step == 1 and classifier.ema.num_updates == 1
    assert {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_t0"} <= checkpoints["classifier_metrics"].keys()
    ckpt = torch.load(checkpoints["classifier"], weights_only=False)
    assert ckpt["hyper_parameters"]["run_config"]["task"] == "classifier"


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@pytest.mark.slow
def test_sample_command_draws_one_row_per_class_per_guidance_scale(checkpoints, compose_sample, tmp_path):
    import sample as sample_command

    common = [f"ckpt_path={checkpoints['diffusion']}", "device=cpu", "sampler=ddim", "steps=2", "min_image_size=null"]
    written = sample_command.run(
        compose_sample(*common, "guidance_scale=[0,3]", "grid.per_class=2", output_dir=tmp_path / "cfg")
    )
    assert set(written) == {"samples_w0.png", "samples_w3.png"}
    for path in written.values():  # 10 rows of 2 images of 8 px, 2 px padding
        assert read_png(path).shape[:2] == (2 + 10 * 10, 2 + 2 * 10)

    written = sample_command.run(
        compose_sample(
            *common,
            "class_label=7",
            "num_samples=3",
            f"classifier.ckpt_path={checkpoints['classifier']}",
            "classifier.scale=2",
            output_dir=tmp_path / "clf",
        )
    )
    assert read_png(written["samples.png"]).shape[:2] == (2 + 10, 2 + 3 * 10)

    bad = [
        (["class_label=10"], ConfigError, "not a class of the checkpoint; use 0..9"),
        (["mode=trajectory", "guidance_scale=1"], ConfigError, "apply to mode=grid"),
        (
            [f"classifier.ckpt_path={checkpoints['diffusion']}"],
            CheckpointError,
            "is a task=diffusion run, not a classifier checkpoint",
        ),
        ([f"ckpt_path={checkpoints['classifier']}"], CheckpointError, "is a task=classifier run, not a diffusion"),
    ]
    for overrides, error, message in bad:
        with pytest.raises(error, match=message):
            sample_command.run(compose_sample(*common, *overrides, output_dir=tmp_path / "bad"))


@pytest.mark.slow
def test_evaluate_sweeps_the_guidance_scale(checkpoints, compose_evaluate, tmp_path):
    from src.evaluation import run

    common = [
        f"ckpt_path={checkpoints['diffusion']}",
        "num_samples=12",
        "batch_size=12",
        "fid=false",
        "sampler=ddim",
        "steps=2",
        "grid_size=20",
        "min_image_size=null",
    ]
    # not configured: the run's own guidance_scale (the digits runs' 0), one set in the run folder itself
    metrics = run(compose_evaluate(*common, output_dir=tmp_path / "own"))
    assert [r["guidance_scale"] for r in metrics["guidance"]["runs"]] == [0.0]
    assert (tmp_path / "own" / "samples_12x8x8x1.npz").is_file() and not list((tmp_path / "own").glob("guidance_w*"))

    out = tmp_path / "eval"
    metrics = run(compose_evaluate(*common, "guidance_scales=[0,1,3]", output_dir=out))
    runs = metrics["guidance"]["runs"]
    assert [r["guidance_scale"] for r in runs] == [0.0, 1.0, 3.0] and metrics["guidance"]["num_classes"] == 10
    for r in runs:
        folder = out / f"guidance_w{r['guidance_scale']:g}"
        assert r["samples"]["npz"] == str(folder / "samples_12x8x8x1.npz") and r["fid"] is None
        with np.load(folder / "samples_12x8x8x1.npz") as npz:  # openai's class-conditional format: arr_1 = labels
            assert npz["arr_0"].shape == (12, 8, 8, 1) and npz["arr_1"].tolist() == [k % 10 for k in range(12)]
        # one row per class, 2 columns (grid_size 20 / 10 classes); classes 2..9 got one image, then a blank
        assert read_png(folder / "samples_grid.png").shape[:2] == (2 + 10 * 10, 2 + 2 * 10)
    assert "samples" not in metrics  # per w only

    cfg = compose_evaluate(
        f"ckpt_path={checkpoints['diffusion']}",
        "num_samples=4",
        "batch_size=4",
        "fid=false",
        "sampler=ddim",
        "steps=2",
        "guidance_scales=[2]",
        f"classifier.ckpt_path={checkpoints['classifier']}",
        output_dir=out,
    )
    metrics = run(cfg)
    assert [r["guidance_scale"] for r in metrics["guidance"]["runs"]] == [2.0]
    assert metrics["guidance"]["classifier"]["ckpt_path"] == str(checkpoints["classifier"])
