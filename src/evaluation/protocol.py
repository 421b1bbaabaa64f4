"""The sampling protocol evaluate.py records and users can cite: which noise each sample set comes from,
the summary over sets (mean, std, min, max; NVlabs/edm reports the minimum FID of three), and the notes
that keep numbers from being compared with the papers' when they are not comparable.

Seeds: the set of seed s holds images s*N .. s*N + N-1 (N = num_samples), so the sets of different seeds
never share an image seed. The batch starting at image i of that range draws all its noise (x_T and every
step) from torch.Generator().manual_seed(i); the samples therefore depend on batch_size, not on the order
or number of sets drawn.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from src.provenance import file_sha256

PAPER_SAMPLE_COUNT = 50_000


def image_seed_range(seed: int, num_samples: int) -> tuple[int, int]:
    """(first, last) image seed of the set of `seed`."""
    if seed < 0:
        raise ValueError(f"seeds must be >= 0, got {seed}")
    return seed * num_samples, seed * num_samples + num_samples - 1


def checked_seeds(seeds, seed: int) -> list[int]:
    """seeds=null -> [seed]; a list of distinct non-negative ints otherwise."""
    values = [seed] if seeds is None else list(seeds) if not isinstance(seeds, int) else [seeds]
    if (
        not values
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in values)
        or len(set(values)) != len(values)
    ):
        raise ValueError(f"seeds must be distinct integers >= 0 such as seeds=[0,1,2], got {seeds!r}")
    return values


def summary(runs: list[dict], keys: list[str]) -> dict:
    """{key: {mean, std (ddof 0 as edm's), min, max, values}} over the runs that have a number for it."""
    out = {}
    for key in keys:
        values = [r[key] for r in runs if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if values:
            array = np.asarray(values, dtype=np.float64)
            out[key] = {
                "mean": float(array.mean()),
                "std": float(array.std()),
                "min": float(array.min()),
                "max": float(array.max()),
                "values": values,
            }
    return out


def sample_count_notes(num_samples: int) -> list[str]:
    if num_samples >= PAPER_SAMPLE_COUNT:
        return []
    return [
        f"{num_samples} samples per set, below the papers' {PAPER_SAMPLE_COUNT}: FID / KID / precision / recall "
        f"depend on the sample count (FID is biased upwards for small sets), so these numbers are not comparable "
        f"with published ones"
    ]


def class_balance_note(labels: torch.Tensor, num_classes: int) -> str | None:
    """A note when the classes are not all drawn equally often (num_samples not a multiple of the classes)."""
    counts = torch.bincount(labels, minlength=num_classes)
    if int(counts.min()) == int(counts.max()):
        return None
    return (
        f"unequal classes: {len(labels)} samples over {num_classes} classes, {int((counts == counts.max()).sum())} "
        f"classes drawn {int(counts.max())} times and {int((counts < counts.max()).sum())} drawn "
        f"{int(counts.min())} times; use a multiple of {num_classes} for balanced classes"
    )


def checkpoint_hash(path) -> str:
    """sha256 prefix of the checkpoint file (16 hex digits)."""
    return file_sha256(path)[:16]
