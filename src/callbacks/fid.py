"""FID and Inception Score of EMA samples during training (distributed over all processes)."""
from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch

from src.diffusion import SamplerOptions
from src.evaluation.metrics import (NUM_LOGITS, FeatureStats, InceptionFeatures, MissingWeightsError, ReferenceImages,
                                    ReferenceStats, accumulate, dataset_name, fid_and_is, load_reference,
                                    reference_cache_path, reference_meta, resolve_weights, save_reference)
from src.evaluation.samples import sample_uint8_batches

log = logging.getLogger(__name__)


def share(total: int, world_size: int, rank: int) -> int:
    """How many of `total` items process `rank` handles (the first total % world_size get one more)."""
    return total // world_size + (1 if rank < total % world_size else 0)


class FIDCallback(L.Callback):
    """Every `every_n_steps` optimizer steps and at the end of training: `num_samples` samples with the
    EMA weights and the run's sampler -> FID (against the real images of `reference_split`) and IS.

    Distributed: each process draws its share of the samples from its own seed (seed + rank) and runs
    Inception on them; the FID statistics are summed and the IS logits gathered across processes, so
    the metrics are those of exactly `num_samples` samples, computed once and logged by rank zero
    (`eval/fid`, `eval/is`, `eval/is_std`).

    Reference statistics are computed once (shared out over the processes as well) and cached under
    `cache_dir`, keyed by dataset, split, image size, number of images, content and Inception weights.

    Args:
        every_n_steps: evaluate every this many optimizer steps (<= 0: only at the end of training).
        num_samples: generated images per evaluation (50k for paper numbers; tiny values are noisy and biased).
        batch_size: images per sampling / Inception batch on each process.
        seed: sampling seed of rank 0 (rank r uses seed + r); the same noise at every evaluation.
        sampler: the sampler options (src.diffusion.SamplerOptions: sampler, steps, spacing, eta, ...), usually the run's.
        feature_extractor_weights_path: local Inception weights (torch-fidelity's
            weights-inception-2015-12-05-6726825d.pth); null: the torch hub cache, downloaded if missing.
            Without weights the callback stops the run in `setup`, naming the file to provide.
        cache_dir: folder of the cached reference statistics.
        reference_split: "train" (as the papers) or "val".
        num_reference_images: the first this many images of the split (null: all).
        isc_splits: number of splits of the Inception Score (torch-fidelity's default 10).
        on_train_end: also evaluate when training ends.
        save_samples: rank zero also writes the evaluated samples to <samples_dir>/fid_samples_step_<N>.npz
            (uint8 NHWC, key arr_0).
        samples_dir: folder of those files.
    """

    def __init__(self, every_n_steps: int, num_samples: int, batch_size: int, seed: int, sampler: dict | None,
                 feature_extractor_weights_path: str | None, cache_dir: str, reference_split: str,
                 num_reference_images: int | None, isc_splits: int, on_train_end: bool, save_samples: bool,
                 samples_dir: str | None):
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
        if num_samples < isc_splits:
            raise ValueError(f"num_samples={num_samples} is below isc_splits={isc_splits}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if reference_split not in ("train", "val"):
            raise ValueError(f"reference_split must be train or val, got {reference_split!r}")
        if save_samples and samples_dir is None:
            raise ValueError("save_samples=true needs samples_dir")
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.options = SamplerOptions.from_mapping(sampler)
        self.weights_path = feature_extractor_weights_path
        self.cache_dir = Path(cache_dir)
        self.reference_split, self.num_reference_images = reference_split, num_reference_images
        self.isc_splits, self.at_train_end = isc_splits, on_train_end
        self.save_samples, self.samples_dir = save_samples, Path(samples_dir) if samples_dir else None
        self.extractor: InceptionFeatures | None = None
        self.reference: ReferenceStats | None = None  # rank zero only
        self.last_step: int | None = None
        self.last_metrics: dict | None = None

    # --- setup: weights, Inception, reference statistics ------------------------------------------------
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.fast_dev_run:
            log.info("FID/IS evaluation is off under fast_dev_run")
            return
        strategy = trainer.strategy
        key = "callbacks.fid.feature_extractor_weights_path"
        # One process per machine may download the weights; the others wait for it, then look for the file.
        error = None
        if trainer.local_rank == 0:
            try:
                resolve_weights(self.weights_path, download=True, config_key=key)
            except MissingWeightsError as err:
                error = err
        strategy.barrier("fid_weights")
        if error is not None:
            raise error
        weights = resolve_weights(self.weights_path, download=False, config_key=key)
        self.extractor = InceptionFeatures(weights).to(strategy.root_device)
        self._setup_reference(trainer)

    def _setup_reference(self, trainer: L.Trainer) -> None:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("FIDCallback needs the Trainer to be given a datamodule (its images are the reference)")
        dataset = {"train": datamodule.train_dataset, "val": datamodule.val_dataset}[self.reference_split]
        images = ReferenceImages(dataset, self.num_reference_images)
        meta = reference_meta(dataset_name(datamodule), self.reference_split, images, self.extractor)
        path = reference_cache_path(self.cache_dir, meta)
        if trainer.is_global_zero:
            self.reference = load_reference(path, meta)
        if not trainer.strategy.broadcast(self.reference is None):
            if trainer.is_global_zero:
                log.info("FID reference: %s (cached in %s)", self.reference.describe(), path)
            return
        if trainer.is_global_zero:
            log.info("computing FID reference statistics: %s %s, %d images -> %s", meta["dataset"],
                     self.reference_split, len(images), path)
        world, rank = trainer.world_size, trainer.global_rank
        stats, _ = accumulate(self.extractor, images.batches(range(rank, len(images), world), self.batch_size),
                              FeatureStats(device=trainer.strategy.root_device))
        self._all_reduce(trainer, stats)
        if trainer.is_global_zero:
            mu, sigma = stats.mean_cov()
            self.reference = ReferenceStats(mu=mu, sigma=sigma, meta=meta)
            save_reference(path, self.reference)

    @staticmethod
    def _all_reduce(trainer: L.Trainer, stats: FeatureStats) -> None:
        for tensor in stats.tensors():
            tensor.copy_(trainer.strategy.reduce(tensor, reduce_op="sum"))

    # --- when to evaluate ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if (self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0 and step != self.last_step
                and self.extractor is not None):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_train_end and trainer.global_step != self.last_step and self.extractor is not None:
            self.evaluate(trainer, pl_module)

    # --- the evaluation ----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> dict:
        """Sample, extract and reduce on every process; the metrics are computed on rank zero and
        returned on every process."""
        if self.extractor is None:
            raise RuntimeError("FIDCallback.evaluate called before setup")
        step = trainer.global_step
        world, rank = trainer.world_size, trainer.global_rank
        counts = [share(self.num_samples, world, r) for r in range(world)]
        device = pl_module.device
        generator = torch.Generator(device=device).manual_seed(self.seed + rank)

        stats, logits_list, kept = FeatureStats(device=device), [], []
        if counts[rank] > 0:
            for images in sample_uint8_batches(pl_module, counts[rank], self.batch_size, self.options,
                                               generator=generator):
                pool, logits = self.extractor(images)
                stats.update(pool)
                logits_list.append(logits)
                if self.save_samples:
                    kept.append(images)
        logits = torch.cat(logits_list) if logits_list else torch.zeros(0, NUM_LOGITS, device=device)
        self._all_reduce(trainer, stats)
        logits = self._gather_rows(trainer, logits.to(device), counts)
        if self.save_samples:
            shape = (0, *pl_module.ema.model.image_shape)
            local = torch.cat(kept) if kept else torch.zeros(shape, dtype=torch.uint8, device=device)
            all_images = self._gather_rows(trainer, local.to(device), counts)
        self.last_step = step
        metrics = None
        if trainer.is_global_zero:
            metrics = fid_and_is(stats, logits, self.reference, self.isc_splits)
            if self.save_samples:
                self.samples_dir.mkdir(parents=True, exist_ok=True)
                np.savez(self.samples_dir / f"fid_samples_step_{step:07d}.npz",
                         arr_0=all_images.permute(0, 2, 3, 1).cpu().numpy())
        # Every process gets the values (so e.g. a checkpoint monitoring eval/fid agrees across ranks);
        # only rank zero writes them to the loggers.
        metrics = trainer.strategy.broadcast(metrics)
        self.last_metrics = {"step": step, **metrics}
        values = {"eval/fid": metrics["fid"], "eval/is": metrics["is"], "eval/is_std": metrics["is_std"]}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        if trainer.is_global_zero:
            self._log(trainer, step, values, metrics["num_samples"])
        return self.last_metrics

    @staticmethod
    def _gather_rows(trainer: L.Trainer, rows: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every process's rows in rank order (shares may differ by one: pad, gather, trim)."""
        if trainer.world_size == 1:
            return rows
        padded = torch.cat([rows, rows.new_zeros(max(counts) - rows.shape[0], *rows.shape[1:])])
        gathered = trainer.strategy.all_gather(padded)  # [world, max(counts), ...]
        return torch.cat([gathered[r, :n] for r, n in enumerate(counts)])

    def _log(self, trainer: L.Trainer, step: int, values: dict, num_samples: int) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(values, step=step)
        nfe = self.options.nfe(trainer.lightning_module.diffusion.num_timesteps)
        log.info("step %d: FID %.3f, IS %.3f +- %.3f (%d EMA samples, %s, %d NFE; reference: %s)", step,
                 values["eval/fid"], values["eval/is"], values["eval/is_std"], num_samples, self.options.as_dict(), nfe,
                 self.reference.describe())
