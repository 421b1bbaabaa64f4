"""Data-parallel training on 2 CPU processes (Lightning ddp_spawn, gloo) against one process.

The comparison is made meaningful by giving every image its own t and noise, keyed by (its index in
the dataset, the step), and by a dataset exactly one global batch long: each step then trains on the
same 8 images with the same t and noise however the ranks split them, so the all-reduced gradient,
the Adam step and the EMA must match the single-process run up to float summation order.
"""

import functools
from pathlib import Path

import lightning as L
import pytest
import torch

from src.data.base import ImageDataModule, UInt8ImageDataset
from src.diffusion import GaussianDiffusion, UniformSampler, make_beta_schedule
from src.lit import DiffusionModule
from src.lit.optim import make_optimizer
from src.models import UNet

NUM_IMAGES = GLOBAL_BATCH = 8
T = 50
STEPS = 3
LR = 1e-3

pytestmark = pytest.mark.slow  # every test trains through the Trainer


class TinyData(ImageDataModule):
    """8 random 1x8x8 images whose label is their index (the key of their t and noise)."""

    channels, image_size, num_classes = 1, 8, NUM_IMAGES

    def build_datasets(self):
        images = torch.randint(
            0, 256, (NUM_IMAGES, 1, 8, 8), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
        )
        dataset = UInt8ImageDataset(images, torch.arange(NUM_IMAGES))
        return dataset, dataset


class KeyedNoiseModule(DiffusionModule):
    """DiffusionModule whose t and noise depend only on (image index, step); writes its state per rank."""

    out_dir: Path

    def training_step(self, batch, batch_idx):
        x0, index = batch
        ts, noises = [], []
        for i in index.tolist():
            gen = torch.Generator().manual_seed(1000 * self.global_step + i)
            ts.append(torch.randint(0, T, (1,), generator=gen))
            noises.append(torch.randn(x0.shape[1:], generator=gen))
        losses = self.diffusion.training_losses(self.net, x0, torch.cat(ts), noise=torch.stack(noises))
        return losses["loss"].mean()

    def on_train_batch_start(self, batch, batch_idx):
        if self.global_step == 0:  # the global stream each rank draws its default t and noise from
            self.first_rng_state = torch.get_rng_state()

    def on_train_end(self):
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if torch.is_tensor(v)}
        torch.save(
            {"state": state, "rng": self.first_rng_state, "world_size": self.trainer.world_size},
            self.out_dir / f"rank{self.global_rank}_of_{self.trainer.world_size}.pt",
        )


def tiny_unet() -> UNet:
    return UNet(
        in_channels=1,
        out_channels=1,
        image_size=8,
        base_channels=32,
        channel_mult=[1, 2],
        num_res_blocks=1,
        attention_resolutions=[4],
        dropout=0.0,
    )


def fit(out_dir: Path, devices: int) -> None:
    torch.manual_seed(0)  # same initial weights in both runs
    module = KeyedNoiseModule(
        net=tiny_unet(),
        diffusion=GaussianDiffusion(make_beta_schedule("linear", T)),
        timestep_sampler=UniformSampler(T),
        ema_decay=0.9,
        lr_warmup_steps=0,
        optimizer=functools.partial(make_optimizer, lr=LR),
    )
    module.out_dir = out_dir
    trainer = L.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp_spawn" if devices > 1 else "auto",
        max_steps=STEPS,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=TinyData(batch_size=GLOBAL_BATCH))


def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    fit(tmp_path, devices=2)
    fit(tmp_path, devices=1)
    rank0, rank1, single = (torch.load(tmp_path / name) for name in ("rank0_of_2.pt", "rank1_of_2.pt", "rank0_of_1.pt"))

    # The ranks hold identical weights and identical EMA weights (DDP broadcasts the initial module,
    # the all-reduced gradient keeps them in step, the EMA follows identical weights).
    assert rank0["state"].keys() == rank1["state"].keys() == single["state"].keys()
    for key, value in rank0["state"].items():
        assert torch.equal(value, rank1["state"][key]), f"{key} differs between the ranks"
    assert any(k.startswith("ema.") for k in rank0["state"])

    # ... and they equal the single-process run on the same global batch, weights and EMA alike, up to
    # float summation order (a mean of two 4-image means vs one 8-image mean). Adam divides by the
    # gradient's size, so where a gradient is near zero that rounding can move a weight by a few percent
    # of a step (LR): the tolerance is a tenth of a step, the steps themselves moved weights by >= LR.
    torch.manual_seed(0)
    initial = {f"net.{k}": v for k, v in tiny_unet().state_dict().items()}
    moved = max((single["state"][k] - v).abs().max().item() for k, v in initial.items())
    assert moved >= LR
    for key, value in single["state"].items():
        torch.testing.assert_close(rank0["state"][key], value, rtol=1e-4, atol=0.1 * LR, msg=key)

    # Each rank draws its default t and noise from a stream of its own (not rank zero's numbers for
    # other images).
    assert not torch.equal(rank0["rng"], rank1["rng"])


# --- exact resume under DDP ----------------------------------------------------------------------
RESUME_IMAGES, RESUME_BATCH = 24, 8  # global batch 8 = 2 ranks x 4 images: epochs of 3 steps


class RandomImages(ImageDataModule):
    channels, image_size, num_classes = 1, 8, None

    def build_datasets(self):
        images = torch.randint(
            0, 256, (RESUME_IMAGES, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
        )
        dataset = UInt8ImageDataset(images, torch.zeros(RESUME_IMAGES, dtype=torch.long))
        return dataset, dataset


class RecordingModule(DiffusionModule):
    """The DiffusionModule as it trains (t and noise from each rank's global stream); writes its end state."""

    out_dir: Path

    def on_train_end(self):
        state = {k: v.detach().clone() for k, v in self.state_dict().items() if torch.is_tensor(v)}
        torch.save({"state": state, "rng": torch.get_rng_state()}, self.out_dir / f"rank{self.global_rank}.pt")


def fit_for_resume(out_dir: Path, max_steps: int, ckpt_path: Path | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    module = RecordingModule(
        net=tiny_unet(),
        diffusion=GaussianDiffusion(make_beta_schedule("linear", T)),
        timestep_sampler=UniformSampler(T),
        ema_decay=0.9,
        lr_warmup_steps=0,
        optimizer=functools.partial(make_optimizer, lr=LR),
    )
    module.out_dir = out_dir
    checkpoints = L.pytorch.callbacks.ModelCheckpoint(dirpath=out_dir, save_last=True, every_n_train_steps=2)
    trainer = L.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=max_steps,
        deterministic=True,
        limit_val_batches=0,
        logger=False,
        callbacks=[checkpoints],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=RandomImages(batch_size=RESUME_BATCH), ckpt_path=ckpt_path, weights_only=False)


def test_ddp_resume_continues_every_ranks_random_stream(tmp_path):
    # Stopped inside the first epoch (step 2 of 3) and resumed on the same 2 ranks, the run must go on with
    # the DistributedSampler's order where it stopped and draw on rank 1 what the uninterrupted run drew
    # there: rank 1's t and noise reach the shared weights through the all-reduced gradient, so a rank
    # that restarted its stream changes every weight.
    fit_for_resume(tmp_path / "uninterrupted", max_steps=4)
    fit_for_resume(tmp_path / "resumed", max_steps=2)
    saved = torch.load(tmp_path / "resumed" / "last.ckpt", weights_only=False)
    assert len(saved["rng_states_per_rank"]) == 2
    assert not torch.equal(saved["rng_states_per_rank"][0]["torch"], saved["rng_states_per_rank"][1]["torch"])
    fit_for_resume(tmp_path / "resumed", max_steps=4, ckpt_path=tmp_path / "resumed" / "last.ckpt")

    for rank in (0, 1):
        a = torch.load(tmp_path / "uninterrupted" / f"rank{rank}.pt")
        b = torch.load(tmp_path / "resumed" / f"rank{rank}.pt")
        assert torch.equal(a["rng"], b["rng"]), f"rank {rank} is elsewhere in its random stream"
        for key, value in a["state"].items():
            assert torch.equal(value, b["state"][key]), f"rank {rank}: {key} differs from the uninterrupted run"
