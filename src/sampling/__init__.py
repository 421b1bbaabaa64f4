"""Sampling from checkpoints, sample.py's work and evaluate.py's sample sets: loading a checkpoint for sampling
(weights, device, sampler options), class labels and guidance, batched sampling to uint8 and .npz files, image
grids, and sample.py's modes (grid, trajectory, interpolate, invert)."""

from .batches import load_npz, sample_uint8_batches, save_npz
from .grids import image_grid, save_grid, save_grid_png, trajectory_grid
from .loading import LoadedCheckpoint, load_checkpoint, pick_device, sampler_options

__all__ = [
    "LoadedCheckpoint",
    "image_grid",
    "load_checkpoint",
    "load_npz",
    "pick_device",
    "sample_uint8_batches",
    "sampler_options",
    "save_grid",
    "save_grid_png",
    "save_npz",
    "trajectory_grid",
]
