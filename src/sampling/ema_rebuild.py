"""EMA weights of any relative width rebuilt from a run's post-hoc EMA snapshots (EDM2 Appendix C.2; the math is
src.lit.ema_profiles, the snapshots are written by src.callbacks.PostHocEMA next to the checkpoints)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from src.errors import CheckpointError, ConfigError
from src.lit.ema_profiles import SNAPSHOT_GLOB, check_std, combine, solve_coefficients, std_to_gamma

log = logging.getLogger(__name__)

# The fit of the target profile (relative L2 error of the combination, from the closed forms) above which the
# snapshots are too few, or too late, to represent it.
MAX_FIT_ERROR = 0.05
ENABLE = "train with posthoc_ema.enabled=true (and posthoc_ema.stds / every_n_steps) to write them"


@dataclass
class Reconstruction:
    std: float
    step: int
    snapshot_steps: list[int]
    snapshot_stds: list[float]
    coefficients: list[float]
    fit_error: float
    state: dict[str, torch.Tensor]  # parameters and buffers of the network, by name

    def protocol(self) -> dict:
        """What metrics.json records of it."""
        return {
            "ema_std": self.std,
            "step": self.step,
            "snapshot_steps": sorted(set(self.snapshot_steps)),
            "snapshot_stds": sorted(set(self.snapshot_stds)),
            "num_snapshots": len(self.snapshot_steps),
            "fit_error": self.fit_error,
        }


def snapshots_folder(ckpt_path: str | Path) -> Path:
    """<run>/checkpoints/phema for a checkpoint <run>/checkpoints/<name>.ckpt."""
    return Path(ckpt_path).resolve().parent / "phema"


def checked_stds(value) -> list[float] | None:
    """ema_std=null -> None (the classic EMA); a number or a list of distinct numbers -> the list."""
    if value is None:
        return None
    values = list(value) if not isinstance(value, (int, float)) else [value]
    try:
        stds = [check_std(v, "ema_std") for v in values]
    except ValueError as err:
        raise ConfigError(f"{err}; or ema_std=null for the classic EMA") from None
    if not stds or len(set(stds)) != len(stds):
        raise ConfigError(
            f"ema_std must be a number or distinct numbers such as ema_std=[0.05,0.08,0.12], got {value!r}"
        )
    return stds


def reconstruct(folder: Path, std: float, step: int) -> Reconstruction:
    """The EMA of relative width `std` at `step` as the least-squares combination of the snapshots in `folder` taken
    at steps <= `step`; a one-line error when there are none or they cannot represent it."""
    files = sorted(folder.glob(SNAPSHOT_GLOB)) if folder.is_dir() else []
    headers = []
    for path in files:
        snapshot = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        if int(snapshot["step"]) <= step:
            headers.append((path, int(snapshot["step"]), float(snapshot["std"]), float(snapshot["gamma"])))
    if not headers:
        raise CheckpointError(
            f"no post-hoc EMA snapshots for the checkpoint's step {step} in {folder}; {ENABLE}, or "
            f"use ema_std=null for the classic EMA"
        )
    steps, stds, gammas = [h[1] for h in headers], [h[2] for h in headers], [h[3] for h in headers]
    coefficients, fit_error = solve_coefficients(steps, gammas, step, std_to_gamma(std))
    if fit_error > MAX_FIT_ERROR:
        raise ConfigError(
            f"ema_std={std:g} at step {step}: the {len(headers)} snapshots in {folder} (steps "
            f"{min(steps)}..{max(steps)}, stds {sorted(set(stds))}) represent it only to "
            f"{100 * fit_error:.1f}% (limit {100 * MAX_FIT_ERROR:g}%); {ENABLE} with a smaller "
            f"posthoc_ema.every_n_steps and stds around {std:g}"
        )
    parameters = combine(
        (float(x), torch.load(path, map_location="cpu", weights_only=True)["parameters"])
        for (path, *_), x in zip(headers, coefficients)
    )
    latest = max(headers, key=lambda h: h[1])[0]
    state = {**torch.load(latest, map_location="cpu", weights_only=True)["buffers"], **parameters}
    log.info(
        "post-hoc EMA std %g at step %d from %d snapshots (steps %d..%d), fit error %.2e",
        std,
        step,
        len(headers),
        min(steps),
        max(steps),
        fit_error,
    )
    return Reconstruction(
        std=std,
        step=step,
        snapshot_steps=steps,
        snapshot_stds=stds,
        coefficients=[float(x) for x in coefficients],
        fit_error=fit_error,
        state=state,
    )


def load_into(net: nn.Module, reconstruction: Reconstruction) -> None:
    """Put the reconstructed weights into `net` (the EMA network), strictly."""
    net.load_state_dict(reconstruction.state, strict=True)
