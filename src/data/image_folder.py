"""Any folder of images (CelebA, LSUN exports, ...) as a DataModule, loaded lazily per item."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .base import DatasetNotFoundError, ImageDataModule, check_channels, check_image_size, split_indices
from .transforms import maybe_hflip, uint8_to_signed

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
ON_BAD_IMAGE = ("skip", "error")


def _visible(name: str) -> bool:
    # Hidden entries (.git, .ipynb_checkpoints, macOS ._ files) are never part of a dataset.
    return not name.startswith(".")


def is_image_file(name: str) -> bool:
    return _visible(name) and name.lower().endswith(IMAGE_EXTENSIONS)


def find_images(root: str | os.PathLike) -> list[Path]:
    """All image files under root (recursive, case-insensitive extensions), sorted for determinism."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if _visible(d)]
        found.extend(Path(dirpath, f) for f in filenames if is_image_file(f))
    return sorted(found)


def list_classes(root: str | os.PathLike) -> list[str]:
    """Class names: the sorted sub-folder names of root, preceded by "" when images lie directly in root.

    Only the top level is listed, so this is cheap enough to answer `num_classes` before setup.
    """
    entries = list(os.scandir(root))
    subfolders = sorted(e.name for e in entries if _visible(e.name) and e.is_dir())
    has_root_images = any(e.is_file() and is_image_file(e.name) for e in entries)
    return ([""] if has_root_images or not subfolders else []) + subfolders


def check_image(path: Path) -> str | None:
    """None when PIL can open and verify the file, else a one-line reason."""
    try:
        with Image.open(path) as img:
            img.verify()
        return None
    except Exception as err:  # PIL raises many types for bad files (OSError, SyntaxError, ValueError, ...)
        return " ".join(f"{type(err).__name__}: {err}".split())


def load_image(path: Path, image_size: int, mode: str) -> np.ndarray:
    """Read one image as uint8 [S, S, C]: convert to mode, shorter side -> S (bicubic), center crop."""
    with Image.open(path) as img:
        img = img.convert(mode)
    w, h = img.size
    scale = image_size / min(w, h)
    new_w, new_h = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC)
    # Same rounding as torchvision's CenterCrop.
    left, top = int(round((new_w - image_size) / 2.0)), int(round((new_h - image_size) / 2.0))
    img = img.crop((left, top, left + image_size, top + image_size))
    array = np.asarray(img, dtype=np.uint8)
    return array[:, :, None] if array.ndim == 2 else array


class ImageFileDataset(Dataset):
    """Image files read on access; items are (float32 [C, S, S] in [-1, 1], int64 label)."""

    def __init__(
        self, paths: Sequence[Path], labels: Sequence[int], image_size: int, channels: int, random_flip: bool = False
    ):
        if len(paths) != len(labels):
            raise ValueError(f"{len(paths)} paths but {len(labels)} labels")
        self.paths = list(paths)
        self.labels = torch.as_tensor(list(labels), dtype=torch.int64)
        self.image_size = int(image_size)
        self.mode = {1: "L", 3: "RGB"}[channels]
        self.random_flip = bool(random_flip)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        path = self.paths[index]
        try:
            array = load_image(path, self.image_size, self.mode)
        except Exception as err:
            # verify() at setup does not decode pixels, so a truncated file can still fail here.
            raise RuntimeError(f"could not load image {path} ({type(err).__name__}: {err}); remove the file") from err
        image = torch.from_numpy(array.copy()).permute(2, 0, 1)
        return uint8_to_signed(maybe_hflip(image, self.random_flip)), self.labels[index]


class ImageFolderDataModule(ImageDataModule):
    """Every image under `root` (recursively), resized and center-cropped to image_size x image_size.

    Labels are indices into the sorted top-level sub-folder names of root (images lying directly in
    root form class 0, so a flat folder is a single class). Files are checked once at setup with PIL's
    verify (header and structure, no full decode).

    Args:
        root: the image folder (required).
        image_size: side of the square crops.
        channels: 3 (RGB) or 1 (grayscale, PIL mode "L").
        batch_size: global batch size (see ImageDataModule).
        random_flip: random horizontal flip of training images.
        val_fraction: fraction held out for validation (at least 1 image when there are >= 2).
        split_seed: seed of the split permutation.
        on_bad_image: "skip" drops unreadable files with a warning (conf/data/image_folder.yaml); "error" raises.
        loader: num_workers, pin_memory, persistent_workers (DataLoader settings, see ImageDataModule).
    """

    def __init__(
        self,
        root: str,
        image_size: int,
        channels: int,
        batch_size: int,
        random_flip: bool,
        val_fraction: float,
        split_seed: int,
        on_bad_image: str,
        **loader,
    ):
        super().__init__(
            batch_size=batch_size, random_flip=random_flip, val_fraction=val_fraction, split_seed=split_seed, **loader
        )
        self.image_size = check_image_size(image_size)
        if on_bad_image not in ON_BAD_IMAGE:
            raise ValueError(f"on_bad_image must be one of {ON_BAD_IMAGE}, got {on_bad_image!r}")
        self.root = str(root)
        self.channels = check_channels(channels)
        self.on_bad_image = on_bad_image
        self._classes: list[str] | None = None
        self.train_paths: list[Path] = []
        self.val_paths: list[Path] = []

    def _not_found(self, what: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"{what}: {os.path.abspath(self.root)} (searched recursively for {' '.join(IMAGE_EXTENSIONS)}, "
            f"any case); set data.root=... to a folder of images"
        )

    @property
    def classes(self) -> list[str]:
        """Sorted class names ("" for images directly in root); read from the top level of root."""
        if self._classes is None:
            if not os.path.isdir(self.root):
                raise self._not_found("image folder not found")
            self._classes = list_classes(self.root)
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def _label(self, path: Path, class_index: dict[str, int]) -> int:
        parts = path.relative_to(self.root).parts
        return class_index[parts[0] if len(parts) > 1 else ""]

    def _drop_bad(self, paths: list[Path]) -> list[Path]:
        # Threads overlap the file reads, which dominate on large folders.
        with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 2)) as pool:
            reasons = list(pool.map(check_image, paths, chunksize=64))
        bad = [(p, r) for p, r in zip(paths, reasons) if r is not None]
        if not bad:
            return paths
        if self.on_bad_image == "error":
            path, reason = bad[0]
            raise DatasetNotFoundError(
                f"unreadable image {path} ({reason}; {len(bad)} bad file(s) in total): remove it or set data.on_bad_image=skip"
            )
        shown = ", ".join(str(p) for p, _ in bad[:5])
        log.warning(
            "skipping %d unreadable image(s) under %s: %s%s",
            len(bad),
            self.root,
            shown,
            ", ..." if len(bad) > 5 else "",
        )
        bad_set = {p for p, _ in bad}
        return [p for p in paths if p not in bad_set]

    def build_datasets(self) -> tuple[ImageFileDataset, ImageFileDataset]:
        if not os.path.isdir(self.root):
            raise self._not_found("image folder not found")
        paths = find_images(self.root)
        if not paths:
            raise self._not_found("no images found in")
        paths = self._drop_bad(paths)
        if not paths:
            raise self._not_found("no readable images found in")
        class_index = {name: i for i, name in enumerate(self.classes)}
        labels = [self._label(p, class_index) for p in paths]
        train_idx, val_idx = split_indices(len(paths), self.val_fraction, self.split_seed)

        def subset(indices: torch.Tensor, flip: bool) -> ImageFileDataset:
            idx = indices.tolist()
            return ImageFileDataset(
                [paths[i] for i in idx], [labels[i] for i in idx], self.image_size, self.channels, flip
            )

        self.train_paths, self.val_paths = [paths[i] for i in train_idx.tolist()], [paths[i] for i in val_idx.tolist()]
        return subset(train_idx, self.random_flip), subset(val_idx, False)
