"""Saving `last.ckpt` when the run is told to stop (preemption, Ctrl+C)."""

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TypeVar

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)

T = TypeVar("T")


class PreemptionCheckpoint(L.Callback):
    """Writes `<dirpath>/last.ckpt` when training is stopped by SIGTERM, SIGUSR1 or Ctrl+C, so that
    `ckpt_path=last` continues from the step where the run stopped, and when training ends normally
    between two periodic saves, so that last.ckpt always holds the final state (as of the end of the last
    step, like a periodic save, so that it resumes exactly).

    On SIGTERM Lightning only sets `trainer.received_sigterm` and raises SIGTERMException later, after
    the step's validation if one is due (and it cuts that validation short). The checkpoint is written
    at the end of the step in which the flag is seen (`on_train_batch_end`, the point where
    ModelCheckpoint saves too, whose restore Lightning handles at epoch ends), or, when the signal came
    later in the step (validation, sample grid), in `on_exception`. Under DDP the ranks agree on the
    flag first, because the save waits for every rank.

    SIGUSR1 (the "you will be stopped soon" signal of SLURM and other schedulers) and the first Ctrl+C
    take the same path; under SLURM auto-requeue Lightning's own SIGUSR1 handler stays in charge (it
    saves `hpc_ckpt_*.ckpt` and requeues the job). A second Ctrl+C interrupts at once: its
    KeyboardInterrupt saves only if it did not land inside a training step (forward, backward,
    optimizer and EMA update), where the weights may be half-updated, and only in single-process runs.

    Any other exception saves nothing: the state after an error (a NaN loss, a bug) must not replace
    the last good checkpoint. Unlike Lightning's OnExceptionCheckpoint, this callback does not change
    what `fit(ckpt_path=None)` loads.
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt"):
        super().__init__()
        self.path = Path(dirpath) / filename
        self._saved_step: int | None = None
        self._final_state: dict | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._saved_step, self._final_state = None, None
        # Runs after Lightning registered its handlers; Lightning puts the previous handlers of every
        # signal back when fitting ends. Handlers that someone else installed are left alone.
        _install(getattr(signal, "SIGUSR1", None), _forward_to_sigterm_handler, unless_handled=True)
        if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            _install(signal.SIGINT, _first_ctrl_c, unless_handled=False)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # ModelCheckpoint writes last.ckpt only every N steps; a run that ends between two of those saves
        # (max_steps not a multiple of N, or a resumed run) must still leave its final state in last.ckpt.
        final_state, self._final_state = self._final_state, None
        if not self._up_to_date(trainer) and self._saved_step != trainer.global_step:
            if final_state is None:
                trainer.save_checkpoint(self.path, weights_only=False)  # a collective under DDP: every rank gets here
            else:
                trainer.strategy.save_checkpoint(final_state, self.path)
                trainer.strategy.barrier("PreemptionCheckpoint.on_train_end")
            self._saved_step = trainer.global_step
            self._mark_last_saved(trainer)
            if trainer.is_global_zero:
                log.info("training finished at step %d; saved %s", trainer.global_step, self.path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        stop = trainer.received_sigterm
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if stop:
            self._save(trainer, "a stop signal (SIGTERM, SIGUSR1 or Ctrl+C)")
        elif trainer.max_steps != -1 and trainer.global_step >= trainer.max_steps:
            # When max_steps stops the run inside an epoch, the fit loop then closes that epoch (counted as
            # complete, the next epoch's number), and a checkpoint written after that resumes at the start of a
            # new shuffle. The state at the end of the last step, where periodic saves are taken, resumes
            # exactly: keep it for on_train_end (the tensors are the live ones, which no longer change).
            self._final_state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._saved_step == trainer.global_step:  # saved at the end of this step already
            return
        if isinstance(exception, SIGTERMException):
            self._save(trainer, "a stop signal (SIGTERM, SIGUSR1 or Ctrl+C)")
        elif isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1:
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            if progress.started > progress.processed:
                log.warning(
                    "interrupted inside training step %d (the weights may be half-updated): nothing saved; "
                    "the last checkpoint stays as it was",
                    trainer.global_step + 1,
                )
                return
            self._save(trainer, "Ctrl+C")

    def _save(self, trainer: L.Trainer, reason: str) -> None:
        up_to_date = self._up_to_date(trainer)
        if not up_to_date:
            trainer.save_checkpoint(self.path, weights_only=False)  # a collective under DDP: every rank gets here
            self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            log.warning(
                "stopped by %s after step %d; %s %s",
                reason,
                trainer.global_step,
                "already up to date:" if up_to_date else "saved",
                self.path,
            )

    def _mark_last_saved(self, trainer: L.Trainer) -> None:
        """ModelCheckpoint's own on_train_end (Lightning 2.6; it runs after this callback's) writes last.ckpt again
        when it has not written it during this fit, with the state after the fit loop closed the epoch: tell it
        that the file is written, and where (its public `last_model_path`)."""
        for callback in trainer.checkpoint_callbacks:
            dirpath = getattr(callback, "dirpath", None) or ""
            last = getattr(callback, "last_model_path", "") or os.path.join(dirpath, "last.ckpt")
            if hasattr(callback, "_last_checkpoint_saved") and os.path.realpath(last) == os.path.realpath(self.path):
                callback._last_checkpoint_saved = str(self.path)
                callback.last_model_path = str(self.path)  # what callers read to find the final checkpoint

    def _up_to_date(self, trainer: L.Trainer) -> bool:
        """Whether ModelCheckpoint already wrote this path at this step (a periodic save just before the stop)."""
        callback = trainer.checkpoint_callback
        last = getattr(callback, "last_model_path", "") if callback is not None else ""
        return (
            bool(last)
            and os.path.realpath(last) == os.path.realpath(self.path)
            and getattr(callback, "_last_global_step_saved", None) == trainer.global_step
        )


def _install(signum, handler, unless_handled: bool) -> None:
    if signum is None or (unless_handled and signal.getsignal(signum) not in (signal.SIG_DFL, None)):
        return
    try:
        signal.signal(signum, handler)
    except ValueError:  # not the main thread: signals cannot be handled here
        pass


def _forward_to_sigterm_handler(signum, frame) -> None:
    handler = signal.getsignal(signal.SIGTERM)
    if callable(handler):
        handler(signal.SIGTERM, frame)


def _first_ctrl_c(signum, frame) -> None:
    sys.stderr.write(
        "\nCtrl+C: stopping after the current step and saving the last checkpoint "
        "(press Ctrl+C again to stop at once)\n"
    )
    signal.signal(signal.SIGINT, signal.default_int_handler)
    _forward_to_sigterm_handler(signum, frame)


@contextlib.contextmanager
def interruptible_sampling(trainer: L.Trainer) -> Iterator[None]:
    """A stop signal (SIGTERM, SIGUSR1, Ctrl+C) stops a callback's sampling at once instead of after it.

    Lightning's handler only sets `trainer.received_sigterm`, which is read between training steps; a sample
    grid or an FID evaluation of hundreds of sampler steps would run to its end first (minutes), and one at
    the end of training would then let the process exit 0. Inside this block the handler also raises
    SIGTERMException, which ends fit like a stop signal during training (PreemptionCheckpoint keeps last.ckpt;
    the entry point exits 143). Sampling changes no training state, so stopping it midway loses nothing.
    A caller skips its sampling when `trainer.received_sigterm` is already set: the run stops at the end of
    this step anyway, with the step's metrics logged.
    """
    previous = signal.getsignal(signal.SIGTERM)

    def stop_now(signum, frame) -> None:
        if callable(previous):
            previous(signum, frame)  # Lightning's: sets the flag, and under DDP tells the other processes
        raise SIGTERMException(f"signal {signum} while sampling")

    try:
        signal.signal(signal.SIGTERM, stop_now)
    except ValueError:  # not the main thread: signals cannot be handled here, the flag stays the only way
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def interruptible_batches(trainer: L.Trainer, batches: Iterable[T]) -> Iterator[T]:
    """`batches` (a sampling generator) iterated under interruptible_sampling."""
    with interruptible_sampling(trainer):
        yield from batches
