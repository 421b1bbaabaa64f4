"""FID, Inception Score, KID and precision / recall of EMA samples during training (distributed over all
processes), with Inception-v3 or any extractor of src.metrics.extractors."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from src import atomic
from src.diffusion import Guidance, SamplerOptions
from src.metrics.extractors import ExtractorRequest, build_extractor
from src.metrics.inception import MissingWeightsError, resolve_weights
from src.metrics.reference_stats import (
    ReferenceStats,
    dataset_name,
    load_reference,
    reference_cache_path,
    reference_meta,
    save_reference,
)
from src.metrics.references import resolve_source
from src.metrics.scores import SampleFeatures, ScoreSettings, score
from src.metrics.statistics import FeatureStats, accumulate
from src.sampling.batches import sample_uint8_batches
from src.sampling.conditioning import balanced_labels

from .preemption import interruptible_batches

log = logging.getLogger(__name__)


def share(total: int, world_size: int, rank: int) -> int:
    """How many of `total` items process `rank` handles (the first total % world_size get one more)."""
    return total // world_size + (1 if rank < total % world_size else 0)


class FIDCallback(L.Callback):
    """Every `every_n_steps` optimizer steps and at the end of training: `num_samples` samples with the
    EMA weights and the run's sampler -> `metrics` (FID, IS, KID, precision / recall) against `reference`.

    Distributed: each process draws its share of the samples from its own seed (seed + rank) and runs
    the extractor on them; the FID statistics are summed and the IS logits (and, for KID / precision /
    recall, the feature rows) gathered across processes, so the metrics are those of exactly
    `num_samples` samples, computed once and logged by rank zero under src.metrics.extractors'
    metric_key names (`eval/fid`, `eval/is`, `eval/kid`, ...; `eval/fd_digits-mlp64`, ... for extractor=digits).

    Reference features are computed once (shared out over the processes as well) and cached under
    `cache_dir`, keyed by dataset, split, image size, number of images, content, extractor and weights.

    Args:
        every_n_steps: evaluate every this many optimizer steps (<= 0: only at the end of training).
        num_samples: generated images per evaluation (50k for paper numbers; tiny values are noisy and biased).
        batch_size: images per sampling / Inception batch on each process.
        seed: sampling seed of rank 0 (rank r uses seed + r); the same noise at every evaluation.
        sampler: the sampler options (src.diffusion.SamplerOptions: sampler, steps, spacing, eta, ...), usually the run's.
        guidance_scale: classifier-free guidance weight for a class-conditional net, whose samples are drawn
            for every class equally often over all processes, as evaluate.py does (None: 0).
        metrics: which of fid, is, kid, prc (src.metrics.scores.METRICS).
        extractor: inception or digits (src.metrics.extractors.EXTRACTORS).
        feature_extractor_weights_path: local Inception weights (torch-fidelity's
            weights-inception-2015-12-05-6726825d.pth); null: the torch hub cache, downloaded if missing.
            Without weights the callback stops the run in `setup`, naming the file to provide.
        cache_dir: folder of the cached reference statistics.
        reference: "train" (as the papers), "val", "judge" (digits), an image folder or an .npz (see
            src.metrics.references).
        num_reference_images: the first this many images of the reference (null: all).
        isc_splits: number of splits of the Inception Score (torch-fidelity's default 10).
        kid_subsets, kid_subset_size, prc_num_images: the KID and precision / recall protocol (ScoreSettings).
        on_train_end: also evaluate when training ends.
        save_samples: rank zero also writes the evaluated samples to <samples_dir>/fid_samples_step_<N>.npz
            (uint8 NHWC, key arr_0).
        samples_dir: folder of those files.
    """

    def __init__(
        self,
        every_n_steps: int,
        num_samples: int,
        batch_size: int,
        seed: int,
        sampler: dict | None,
        feature_extractor_weights_path: str | None,
        cache_dir: str,
        reference: str,
        num_reference_images: int | None,
        isc_splits: int,
        on_train_end: bool,
        save_samples: bool,
        samples_dir: str | None,
        metrics: list[str],
        extractor: str,
        kid_subsets: int,
        kid_subset_size: int | None,
        prc_num_images: int | None,
        guidance_scale: float | None = None,
    ):
        super().__init__()
        if num_samples < 2:
            raise ValueError(f"num_samples must be >= 2 for a covariance, got {num_samples}")
        self.settings = ScoreSettings.checked(
            list(metrics),
            isc_splits=isc_splits,
            kid_subsets=kid_subsets,
            kid_subset_size=kid_subset_size,
            prc_num_images=prc_num_images,
        )
        if "is" in self.settings.metrics and num_samples < isc_splits:
            raise ValueError(f"num_samples={num_samples} is below isc_splits={isc_splits}")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        self.guidance_scale = 0.0 if guidance_scale is None else guidance_scale
        if save_samples and samples_dir is None:
            raise ValueError("save_samples=true needs samples_dir")
        self.every_n_steps, self.num_samples, self.batch_size, self.seed = every_n_steps, num_samples, batch_size, seed
        self.options = SamplerOptions.from_mapping(sampler)
        self.weights_path = feature_extractor_weights_path
        self.cache_dir = Path(cache_dir)
        self.reference_spec, self.num_reference_images = str(reference), num_reference_images
        self.extractor_choice = extractor
        self.isc_splits, self.at_train_end = isc_splits, on_train_end
        self.save_samples, self.samples_dir = save_samples, Path(samples_dir) if samples_dir else None
        self.extractor = None
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
        if self.extractor_choice == "inception":
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
        request = ExtractorRequest(
            image_shape=tuple(pl_module.net.image_shape),
            weights_path=self.weights_path,
            weights_key=key,
            download=False,
        )
        self.extractor = build_extractor(self.extractor_choice, request, strategy.root_device)
        # The widths of features and logits, for the empty shares of processes that draw no sample.
        blank = torch.zeros(1, *request.image_shape, dtype=torch.uint8, device=strategy.root_device)
        pool, logits = self.extractor(blank)
        self.feature_dim, self.num_logits = pool.shape[1], logits.shape[1]
        self._setup_reference(trainer, request.image_shape)

    def _setup_reference(self, trainer: L.Trainer, image_shape: tuple[int, int, int]) -> None:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise RuntimeError("FIDCallback needs the Trainer to be given a datamodule (its images are the reference)")

        def split_dataset(split: str):
            return {"train": datamodule.train_dataset, "val": datamodule.val_dataset}[split], dataset_name(datamodule)

        source = resolve_source(self.reference_spec, image_shape, self.num_reference_images, split_dataset)
        if source.stats is not None:  # an npz of mu / sigma: nothing to compute
            self.reference = source.stats if trainer.is_global_zero else None
            return
        images = source.images
        meta = reference_meta(source.dataset, source.split, images, self.extractor)
        path = reference_cache_path(self.cache_dir, meta)
        if trainer.is_global_zero:
            self.reference = load_reference(path, meta)
        if not trainer.strategy.broadcast(self.reference is None):
            if trainer.is_global_zero:
                log.info("reference: %s (cached in %s)", self._describe_reference(), path)
            return
        if trainer.is_global_zero:
            log.info(
                "computing reference features: %s %s, %d images -> %s",
                meta["dataset"],
                meta["split"],
                len(images),
                path,
            )
        # Contiguous shares, gathered in rank order: the rows keep the images' order (KID's subsets depend on it).
        world, rank = trainer.world_size, trainer.global_rank
        counts = [share(len(images), world, r) for r in range(world)]
        start = sum(counts[:rank])
        device = trainer.strategy.root_device
        batches = (b.to(device) for b in images.batches(range(start, start + counts[rank]), self.batch_size))
        stats, _, rows = accumulate(self.extractor, batches, FeatureStats(self.feature_dim, device), keep_features=True)
        self._all_reduce(trainer, stats)
        rows = self._gather_rows(trainer, rows.to(device), counts)
        if trainer.is_global_zero:
            mu, sigma = stats.mean_cov()
            self.reference = ReferenceStats(mu=mu, sigma=sigma, meta=meta, features=rows.cpu().numpy())
            save_reference(path, self.reference)

    @staticmethod
    def _all_reduce(trainer: L.Trainer, stats: FeatureStats) -> None:
        for tensor in stats.tensors():
            tensor.copy_(trainer.strategy.reduce(tensor, reduce_op="sum"))

    # --- when to evaluate ------------------------------------------------------------------------------
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if (
            self.every_n_steps > 0
            and step > 0
            and step % self.every_n_steps == 0
            and step != self.last_step
            and self.extractor is not None
        ):
            self.evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        if self.at_train_end and trainer.global_step != self.last_step and self.extractor is not None:
            self.evaluate(trainer, pl_module)

    # --- the evaluation ----------------------------------------------------------------------------------
    def _labels(self, num_classes: int | None, counts: list[int], rank: int) -> tuple[torch.Tensor | None, Guidance]:
        """This process's labels (None for an unconditional net): image i of the whole set is of class
        i % num_classes, so every class is drawn equally often over all processes."""
        if num_classes is None:
            return None, Guidance()
        first = sum(counts[:rank])
        return balanced_labels(first + counts[rank], num_classes)[first:], Guidance(scale=self.guidance_scale)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module) -> dict:
        """Sample, extract and reduce on every process; the metrics are computed on rank zero and
        returned on every process."""
        if self.extractor is None:
            raise RuntimeError("FIDCallback.evaluate called before setup")
        step = trainer.global_step
        if trainer.strategy.reduce_boolean_decision(trainer.received_sigterm, all=False):  # every rank agrees
            log.info("stopping: no FID evaluation at step %d", step)
            return {}
        counts = [share(self.num_samples, trainer.world_size, r) for r in range(trainer.world_size)]
        stats, logits, rows, all_images = self._sample_features(trainer, pl_module, counts)
        self.last_step = step
        metrics = None
        if trainer.is_global_zero:
            features = SampleFeatures(stats=stats, logits=logits, rows=None if rows is None else rows.cpu())
            values, unavailable = score(features, self.reference, self.settings, self.extractor.name)
            for key, why in unavailable.items():
                log.warning("%s not computed: %s", key, why)
            metrics = {
                **{k: v for k, v in values.items() if isinstance(v, float)},
                "num_samples": int(stats.count.item()),
            }
            if self.save_samples:
                atomic.savez(
                    self.samples_dir / f"fid_samples_step_{step:07d}.npz",
                    arr_0=all_images.permute(0, 2, 3, 1).cpu().numpy(),
                )
        # Every process gets the values (so e.g. a checkpoint monitoring eval/fid agrees across ranks);
        # only rank zero writes them to the loggers.
        metrics = trainer.strategy.broadcast(metrics)
        self.last_metrics = {"step": step, **metrics}
        values = {f"eval/{k}": v for k, v in metrics.items() if k != "num_samples"}
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in values.items()})
        if trainer.is_global_zero:
            self._log(trainer, step, values, metrics["num_samples"])
        return self.last_metrics

    def _sample_features(self, trainer: L.Trainer, pl_module, counts: list[int]):
        """This process's share of the samples through the extractor, reduced over all processes:
        (feature statistics, logits, feature rows or None, the samples themselves or None)."""
        rank, device = trainer.global_rank, pl_module.device
        generator = torch.Generator(device=device).manual_seed(self.seed + rank)
        stats, logits_list, rows_list, kept = FeatureStats(self.feature_dim, device=device), [], [], []
        labels, guidance = self._labels(getattr(pl_module.net, "num_classes", None), counts, rank)
        if counts[rank] > 0:
            batches = sample_uint8_batches(
                pl_module, counts[rank], self.batch_size, self.options, guidance, generator=generator, labels=labels
            )
            for images in interruptible_batches(trainer, batches):  # a stop signal ends it at once
                pool, logits = self.extractor(images)
                stats.update(pool)
                logits_list.append(logits)
                if self.settings.needs_rows:
                    rows_list.append(pool.float())
                if self.save_samples:
                    kept.append(images)
        logits = torch.cat(logits_list) if logits_list else torch.zeros(0, self.num_logits, device=device)
        self._all_reduce(trainer, stats)
        logits = self._gather_rows(trainer, logits.to(device), counts)
        rows = all_images = None
        if self.settings.needs_rows:
            local = torch.cat(rows_list) if rows_list else torch.zeros(0, self.feature_dim, device=device)
            rows = self._gather_rows(trainer, local.to(device), counts)
        if self.save_samples:
            shape = (0, *pl_module.ema.model.image_shape)
            local = torch.cat(kept) if kept else torch.zeros(shape, dtype=torch.uint8, device=device)
            all_images = self._gather_rows(trainer, local.to(device), counts)
        return stats, logits, rows, all_images

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
        shown = ", ".join(f"{k.removeprefix('eval/')} {v:.4g}" for k, v in values.items())
        log.info(
            "step %d: %s (%s; %d EMA samples, %s, %d NFE; reference: %s)",
            step,
            shown,
            self.extractor.name,
            num_samples,
            self.options.as_dict(),
            nfe,
            self._describe_reference(),
        )

    def _describe_reference(self) -> str:
        m = self.reference.meta
        return f"{self.reference_spec}: {m.get('dataset')} {m.get('split')}, {m.get('num_images')} images"
