"""CIFAR-10 (torchvision's python-format files) as a DataModule."""

from __future__ import annotations

import contextlib
import os
import pickle
import socket
import tarfile
from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from .base import DatasetNotFoundError, ImageDataModule, UInt8ImageDataset, check_image_size
from .transforms import resize_uint8

# A stalled connection would otherwise block urlopen indefinitely (it has no timeout of its own).
DOWNLOAD_SOCKET_TIMEOUT_S = 60.0


@contextlib.contextmanager
def _socket_timeout(seconds: float):
    previous = socket.getdefaulttimeout()
    if previous is None:
        socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())


class CIFAR10Files(CIFAR10):
    """torchvision's CIFAR10 with an existence-only integrity check and validated loading.

    torchvision compares the md5 of every batch file, which rejects re-packed or reduced copies in the
    same format (mirrors, test fixtures); here a file only has to exist and parse. The download keeps
    torchvision's md5 check of the archive. Every failure is a DatasetNotFoundError with one line that
    says what is wrong and where the files belong.
    """

    def __init__(self, root: str | os.PathLike, train: bool = True, download: bool = False):
        # CIFAR10.__init__ is bypassed: it raises bare KeyError/ValueError on malformed files without
        # naming them. VisionDataset.__init__ only stores root and transforms.
        super(CIFAR10, self).__init__(os.path.abspath(os.path.expanduser(root)))
        self.train = train
        if download:
            self.download()
        missing = self._missing_files()
        if missing:
            reason = f"the download did not create {missing[0]}" if download else "data.download=false"
            raise self._not_found(reason)
        files = self.train_list if train else self.test_list
        images, labels = [], []
        for name, _ in files:
            data, targets = self._read_batch(self.folder / name)
            images.append(data)
            labels.extend(targets)
        self.data = np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision
        self.targets = labels
        self._load_meta()

    @property
    def folder(self) -> Path:
        return Path(self.root) / self.base_folder

    def _not_found(self, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"CIFAR-10 files not found under {self.folder} and could not be downloaded ({reason}): "
            f"download {self.url} and extract it so that {self.folder / self.train_list[0][0]} exists, "
            f"or set data.root=... to the folder that contains {self.base_folder}/"
        )

    def _missing_files(self) -> list[str]:
        names = [name for name, _ in self.train_list + self.test_list] + [self.meta["filename"]]
        return [str(self.folder / name) for name in names if not (self.folder / name).is_file()]

    def _check_integrity(self) -> bool:
        return not self._missing_files()

    def download(self) -> None:
        if self._check_integrity():
            return
        try:
            with _socket_timeout(DOWNLOAD_SOCKET_TIMEOUT_S):
                download_and_extract_archive(self.url, self.root, filename=self.filename, md5=self.tgz_md5)
        except (OSError, RuntimeError, tarfile.TarError, EOFError) as err:
            # OSError covers URLError/HTTPError/timeouts; RuntimeError is torchvision's md5 mismatch.
            raise self._not_found(_one_line(err)) from err

    def _bad_file(self, path: Path, reason: str) -> DatasetNotFoundError:
        return DatasetNotFoundError(
            f"CIFAR-10 file {path} is unreadable or not in the CIFAR-10 python format ({reason}); replace it with the "
            f"file from {self.url} (or delete {self.folder} and use data.download=true)"
        )

    def _unpickle(self, path: Path) -> dict:
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception as err:  # pickle raises many types (UnpicklingError, EOFError, ValueError, ...)
            raise self._bad_file(path, _one_line(err)) from err
        if not isinstance(entry, dict):
            raise self._bad_file(path, f"expected a pickled dict, got {type(entry).__name__}")
        # The official files are Python 2 pickles (str keys under latin1); Python 3 re-packs have bytes keys.
        return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in entry.items()}

    def _read_batch(self, path: Path) -> tuple[np.ndarray, list[int]]:
        entry = self._unpickle(path)
        if "data" not in entry or "labels" not in entry:
            raise self._bad_file(path, f"keys {sorted(map(str, entry))}, expected 'data' and 'labels'")
        data = entry["data"]
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            shape = getattr(data, "shape", None)
            raise self._bad_file(
                path,
                f"'data' must be a uint8 array [N, 3072], got {type(data).__name__} {getattr(data, 'dtype', '')} {shape}",
            )
        try:
            labels = [int(v) for v in entry["labels"]]
        except (TypeError, ValueError) as err:
            raise self._bad_file(path, f"'labels' must be a list of ints ({_one_line(err)})") from err
        if len(labels) != len(data):
            raise self._bad_file(path, f"{len(data)} images but {len(labels)} labels")
        if labels and not 0 <= min(labels) <= max(labels) <= 9:
            raise self._bad_file(path, f"labels must lie in 0..9, got {min(labels)}..{max(labels)}")
        return data, labels

    def _load_meta(self) -> None:
        path = self.folder / self.meta["filename"]
        entry = self._unpickle(path)
        names = entry.get(self.meta["key"])
        if not isinstance(names, (list, tuple)) or len(names) != 10:
            raise self._bad_file(path, f"expected '{self.meta['key']}' with 10 class names")
        self.classes = [n.decode("latin1") if isinstance(n, bytes) else str(n) for n in names]
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}


class CIFAR10DataModule(ImageDataModule):
    """CIFAR-10, 3 channels, labels 0..9: the train split for training, the test split for validation.

    Validation uses the official 10k test images, so there is no val_fraction / split_seed here.

    Args:
        root: folder that contains (or will receive) `cifar-10-batches-py/`.
        download: fetch the archive from the official site when the files are missing (on rank 0, in
            prepare_data); offline, extract it by hand (the error message says where).
        image_size: side of the square images; other than 32 the images are resized once in memory
            (bilinear, antialiased when shrinking) and re-quantized to 8 bits.
        batch_size: global batch size (see ImageDataModule).
        random_flip: random horizontal flip of training images (on in conf/data/cifar10.yaml, as in DDPM).
        loader: num_workers, pin_memory, persistent_workers (DataLoader settings, see ImageDataModule).
    """

    channels = 3
    num_classes = 10

    def __init__(self, root: str, download: bool, image_size: int, batch_size: int, random_flip: bool, **loader):
        super().__init__(batch_size=batch_size, random_flip=random_flip, **loader)
        self.root = str(root)
        self.download = bool(download)
        self.image_size = check_image_size(image_size)

    def prepare_data(self) -> None:
        # Lightning runs this on one process per node, so DDP ranks do not download concurrently.
        if self.download:
            CIFAR10Files(self.root, train=False, download=True)

    def _load_split(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ds = CIFAR10Files(self.root, train=train, download=self.download)
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return resize_uint8(images, self.image_size), torch.tensor(ds.targets, dtype=torch.int64)

    def build_datasets(self) -> tuple[UInt8ImageDataset, UInt8ImageDataset]:
        train_images, train_labels = self._load_split(train=True)
        val_images, val_labels = self._load_split(train=False)
        return (
            UInt8ImageDataset(train_images, train_labels, random_flip=self.random_flip),
            UInt8ImageDataset(val_images, val_labels, random_flip=False),
        )
