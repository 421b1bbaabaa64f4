"""A training DataLoader that a resumed run puts back at its position inside an epoch."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler


class EpochShuffleSampler(RandomSampler):
    """RandomSampler whose order is a function of (seed, epoch), like DistributedSampler's: Lightning calls
    `set_epoch` before every epoch, so a resumed run redraws any epoch's order without saved RNG state."""

    def __init__(self, data_source, seed: int):
        super().__init__(data_source)
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()


class _SkipInEpoch:
    """The batch sampler whose next pass leaves out its first `batches` batches if that pass is of `epoch`
    (their indices are drawn, their images not loaded). Without workers the pass draws lazily, at its
    first batch, which Lightning requests after `set_epoch`, so a resume whose epoch Lightning counts as
    finished (e.g. with limit_train_batches) starts the next epoch whole. One-shot, because an iterator
    with persistent workers keeps this object for every later epoch."""

    def __init__(self, batch_sampler, loader: ResumableDataLoader, epoch: int | None, batches: int):
        self.batch_sampler, self.loader, self.pending = batch_sampler, loader, (epoch, batches)

    def __iter__(self):
        pending, self.pending = self.pending, None
        return self._pass(pending)

    def _pass(self, pending):
        batches = iter(self.batch_sampler)
        if pending is not None and self.loader._epoch() == pending[0]:
            for _ in range(pending[1]):
                next(batches, None)
            self.loader._handed_out = pending[1]
        yield from batches

    def __len__(self) -> int:
        return len(self.batch_sampler)


class ResumableDataLoader(DataLoader):
    """DataLoader whose place in the epoch is part of the checkpoint.

    Lightning stores `state_dict()` of a training loader that has one and hands it to `load_state_dict()`
    before the resumed run's first `iter()`. With an order that depends only on the epoch
    (EpochShuffleSampler, or the DistributedSampler Lightning puts in under DDP), the state is the epoch
    and the number of batches handed out in it: the resumed pass redraws that epoch's order and skips
    those batches. Lightning takes one batch at a time from a loader with a length (no prefetch), so
    batches handed out are batches trained on. Iterators draw their base seed from `generator`, not the
    global RNG, so creating one does not shift the random numbers of training. Worker processes started
    by a resumed run get new random streams (e.g. for flips); with num_workers=0 flips draw from the
    global RNG, which the checkpoint restores.
    """

    def __init__(self, *args, generator: torch.Generator | None = None, **kwargs):
        if generator is None:
            raise ValueError("ResumableDataLoader needs a generator, or creating an iterator draws from the global RNG")
        super().__init__(*args, generator=generator, **kwargs)
        self._handed_out = 0
        self._pending: tuple[int | None, int] | None = None
        self._skip: tuple[int | None, int] | None = None

    def _epoch(self) -> int | None:
        return getattr(self.sampler, "epoch", None)

    @property
    def _index_sampler(self):
        sampler = super()._index_sampler
        return sampler if self._skip is None else _SkipInEpoch(sampler, self, *self._skip)

    def __iter__(self) -> Iterator[Any]:
        self._handed_out = 0
        self._skip, self._pending = self._pending, None  # read once, by the iterator being created or reset
        try:
            batches = super().__iter__()
        finally:
            self._skip = None
        return self._count(batches)

    def _count(self, batches: Iterator[Any]) -> Iterator[Any]:
        for batch in batches:
            self._handed_out += 1
            yield batch

    def state_dict(self) -> dict[str, Any]:
        epoch = self._epoch()
        if epoch is not None and self._handed_out >= len(self):  # a whole epoch: the next one starts whole
            return {"epoch": epoch + 1, "batches": 0}
        return {"epoch": epoch, "batches": self._handed_out}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = (state["epoch"], int(state["batches"]))
        # Worker processes take their first indices when the iterator is created, before Lightning's
        # set_epoch: the sampler must already be at the saved epoch then.
        if state["epoch"] is not None and callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(state["epoch"])
