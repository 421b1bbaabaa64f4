"""Optimizers with the fastest of torch's implementations for the device the parameters live on."""
from collections.abc import Iterable
from typing import Literal

import torch
from hydra.utils import get_class

Implementation = Literal["auto", "fused", "foreach", "for-loop"]


def make_optimizer(params: Iterable[torch.nn.Parameter], name: str = "torch.optim.Adam",
                   implementation: Implementation = "auto", **hyperparameters) -> torch.optim.Optimizer:
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
        raise ValueError(f"unknown optimizer implementation {implementation!r}; choose auto, fused, foreach or for-loop")
    return cls(params, **hyperparameters, **kernels)



def with_linear_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> dict:
    """Lightning's configure_optimizers answer: `optimizer` with its LR ramped linearly from 0 over
    `warmup_steps` optimizer steps, stepped every step."""
    warmup = max(1, int(warmup_steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
