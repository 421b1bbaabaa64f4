"""Optimizers with the fastest of torch's implementations for the device the parameters live on."""

import math
from collections.abc import Iterable
from typing import Literal

import torch
from hydra.utils import get_class

from src.errors import ConfigError

Implementation = Literal["auto", "fused", "foreach", "for-loop"]


def make_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str = "torch.optim.Adam",
    implementation: Implementation = "auto",
    **hyperparameters,
) -> torch.optim.Optimizer:
    """`name`(params, **hyperparameters) with its update kernel chosen by `implementation`:

    "fused": one kernel per step over all tensors (CUDA; rounds differently from the others in the last bit);
    "foreach": a few kernels over tensor lists, the same numbers as the per-tensor loop;
    "for-loop": one set of kernels per tensor;
    "auto": fused when every parameter is on a GPU, otherwise torch's own default (the per-tensor loop
        on CPU, where foreach measured 1.5x slower: benchmarks/update_kernels.py). Lightning builds the
        optimizer after moving the module to its device, so the parameters are already where they train.
    """
    params = list(params)
    cls = get_class(name)
    if implementation == "auto":
        # Parameter groups (dicts) count as not on a GPU: foreach works everywhere.
        on_gpu = bool(params) and all(isinstance(p, torch.Tensor) and p.is_cuda for p in params)
        if not on_gpu:
            return cls(params, **hyperparameters)
        implementation = "fused"
    if implementation == "fused":
        kernels = {"fused": True}
    elif implementation == "foreach":
        kernels = {"foreach": True}
    elif implementation == "for-loop":
        kernels = {"foreach": False}
    else:
        raise ValueError(
            f"unknown optimizer implementation {implementation!r}; choose auto, fused, foreach or for-loop"
        )
    return cls(params, **hyperparameters, **kernels)


LR_SCHEDULES = ("constant", "cosine")


def check_lr_schedule(schedule: str) -> None:
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose one of {', '.join(LR_SCHEDULES)}")


def with_linear_warmup(
    optimizer: torch.optim.Optimizer, warmup_steps: int, schedule: str = "constant", total_steps: int | None = None
) -> dict:
    """Lightning's configure_optimizers answer: `optimizer` with its LR ramped linearly from 0 over
    `warmup_steps` optimizer steps, stepped every step; then held (schedule "constant") or brought down
    along a half cosine towards 0 at `total_steps` ("cosine": the last steps at a small LR settle the
    weights, which the EMA of a short run cannot do alone). Step s (from 0) uses
    lr * min(1, (s + 1) / warmup) * (1 + cos(pi * clip((s + 1 - warmup) / (total - warmup + 1), 0, 1))) / 2,
    so the last warm-up step has the full LR and the last step a small positive one (a run no longer than
    its warm-up only ramps)."""
    warmup = max(1, int(warmup_steps))
    check_lr_schedule(schedule)
    if schedule == "cosine" and (total_steps is None or total_steps < 1):
        raise ConfigError(
            f"lr_schedule=cosine decays towards 0 at trainer.max_steps, which must be set (a positive "
            f"number of steps); got trainer.max_steps={total_steps}"
        )

    def factor(step: int) -> float:
        ramp = min(1.0, (step + 1) / warmup)
        if schedule == "constant":
            return ramp
        progress = min(1.0, max(0, step + 1 - warmup) / max(1, total_steps - warmup + 1))  # none within the warm-up
        return ramp * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
