"""Post-hoc EMA during training (EDM2, Karras et al. 2024, Sec. 3): power-function EMAs of the network tracked at a
few relative widths, and their snapshots written every N steps, from which evaluate.py / sample.py reconstruct an
EMA of any width after training (src.lit.ema_profiles, src.sampling.ema_rebuild)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L

from src import atomic
from src.errors import ConfigError
from src.lit import PowerFunctionEMA
from src.lit.ema_profiles import check_std, std_to_gamma

log = logging.getLogger(__name__)


def snapshot_name(step: int, std: float) -> str:
    return f"phema-{step:07d}-{std:.4f}.pt"


class PostHocEMA(L.Callback):
    """Tracks one PowerFunctionEMA of `pl_module.net` per relative width in `stds` (updated after every optimizer
    step) and writes their snapshots to `dirpath/phema-<step>-<std>.pt` every `every_n_steps` steps and at the end
    of training, atomically; each file holds {"step", "std", "gamma", "parameters" (the averages, float32 where
    the net is lower precision), "buffers"}.

    The tracked averages live here, not in the LightningModule (which keeps its classic EMA), and are saved in the
    Lightning checkpoint (this callback's state_dict) so a resumed run continues them exactly. The profiles start
    at step 1, so a run resumed without this state (trained with it off) is refused. enabled=false does nothing.
    """

    def __init__(self, enabled: bool, stds: Sequence[float], every_n_steps: int, dirpath: str):
        super().__init__()
        self.enabled = bool(enabled)
        self.stds = [float(s) for s in stds]
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        if not self.enabled:
            return
        try:
            for std in self.stds:
                check_std(std, "posthoc_ema.stds values")
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not self.stds or len(set(self.stds)) != len(self.stds):
            raise ConfigError(
                f"posthoc_ema.stds must be distinct relative widths such as [0.05,0.10], got {list(stds)}"
            )
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise ConfigError(f"posthoc_ema.every_n_steps must be a positive integer, got {every_n_steps!r}")
        self.gammas = [std_to_gamma(s) for s in self.stds]
        self.emas: list[PowerFunctionEMA] | None = None
        self._restored: list[dict] | None = None
        self._trainer: L.Trainer | None = None
        self._module: L.LightningModule | None = None
        self._written_step: int | None = None

    # --- tracking -------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        # Built here, after the module is on its device and the checkpoint (with this state) is restored.
        self.emas = [PowerFunctionEMA(pl_module.net, gamma) for gamma in self.gammas]
        self._trainer, self._module, self._written_step = trainer, pl_module, None
        if self._restored is not None:
            for ema, state in zip(self.emas, self._restored):
                ema.load_state_dict(state)
            self._restored = None
        elif trainer.global_step > 0:
            raise ConfigError(
                f"posthoc_ema.enabled=true but the checkpoint resumed at step {trainer.global_step} was "
                f"trained without it (the EMA profiles must start at step 1); resume with "
                f"posthoc_ema.enabled=false, or train a new run with posthoc_ema.enabled=true"
            )
        if trainer.global_step != self.emas[0].num_updates:
            raise ConfigError(
                f"the checkpoint's post-hoc EMA has {self.emas[0].num_updates} updates but the run is at "
                f"step {trainer.global_step}; resume from a checkpoint written by the same run"
            )

    def _catch_up(self) -> None:
        """One update per optimizer step not yet averaged (none under gradient accumulation's non-stepping batches).
        Also called when a checkpoint is built, so its state is that of the end of the step, whatever the order in
        which the callbacks' batch-end hooks ran."""
        if self.emas is None or self._trainer is None:
            return
        while self.emas[0].num_updates < self._trainer.global_step:
            for ema in self.emas:
                ema.update(self._module.net)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx) -> None:
        if not self.enabled:
            return
        self._catch_up()
        step = trainer.global_step
        if step % self.every_n_steps == 0 and step != self._written_step:
            self._write(trainer, step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or self.emas is None:
            return
        self._catch_up()
        if trainer.global_step > 0 and trainer.global_step != self._written_step:
            self._write(trainer, trainer.global_step)  # the final weights are always one of the snapshots
        self._trainer = self._module = None

    def _write(self, trainer: L.Trainer, step: int) -> None:
        self._written_step = step
        if not trainer.is_global_zero:
            return
        # the persistent buffers (the state_dict's entries that are not parameters), copied from the live net
        names = {name for name, _ in self.emas[0].model.named_parameters()}
        buffers = {
            name: b.detach().to("cpu", copy=True)
            for name, b in self.emas[0].model.state_dict().items()
            if name not in names
        }
        for std, ema in zip(self.stds, self.emas):
            atomic.torch_save(
                {"step": step, "std": std, "gamma": ema.gamma, "parameters": ema.averaged_state(), "buffers": buffers},
                self.dirpath / snapshot_name(step, std),
            )
        log.debug("post-hoc EMA snapshots of step %d written to %s", step, self.dirpath)

    # --- checkpoint state ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if not self.enabled or self.emas is None:
            return {}
        self._catch_up()
        return {"stds": list(self.stds), "gammas": list(self.gammas), "emas": [ema.state_dict() for ema in self.emas]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self.enabled or not state_dict:
            return
        if [float(s) for s in state_dict["stds"]] != self.stds:
            saved = ",".join(f"{s:g}" for s in state_dict["stds"])
            raise ConfigError(
                f"the checkpoint tracks post-hoc EMA profiles stds=[{saved}], this run asks for "
                f"{self.stds}; resume with posthoc_ema.stds=[{saved}]"
            )
        self._restored = state_dict["emas"]
