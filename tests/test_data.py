"""Data layer: value range and 8-bit grid, splits, flips, CIFAR-10 files, image folders, configs."""

import inspect
import logging
import pickle
import urllib.error
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from src.data import CIFAR10DataModule, DatasetNotFoundError, DigitsDataModule, ImageFolderDataModule

CONF_DATA = Path(__file__).resolve().parents[1] / "conf" / "data"


def data_args(name: str, **overrides) -> dict:
    """The constructor arguments in conf/data/<name>.yaml (the data modules take their settings from the
    config), with in-process, unpinned loading (these tests run on the CPU), then `overrides`."""
    args = OmegaConf.to_container(OmegaConf.load(CONF_DATA / f"{name}.yaml"))
    del args["_target_"]
    return {**args, "num_workers": 0, "pin_memory": False, **overrides}


def assert_on_8bit_grid(x: torch.Tensor) -> None:
    v = x * 127.5 + 127.5
    assert torch.allclose(v, v.round(), atol=1e-3)


@pytest.fixture(scope="module")
def digits():
    dm = DigitsDataModule(**data_args("digits", batch_size=64))
    dm.setup()
    return dm


# ---------------------------------------------------------------- digits


def test_digits_batches_shape_range_and_grid(digits):
    assert (digits.channels, digits.image_size, digits.num_classes) == (1, 16, 10)
    x, y = next(iter(digits.train_dataloader()))
    assert x.shape == (64, 1, 16, 16) and x.dtype == torch.float32
    assert y.shape == (64,) and y.dtype == torch.int64
    everything = torch.stack([digits.train_dataset[i][0] for i in range(len(digits.train_dataset))])
    assert everything.min() == -1.0 and everything.max() == 1.0
    assert_on_8bit_grid(everything)
    labels = torch.cat([digits.train_dataset.labels, digits.val_dataset.labels])
    assert set(labels.tolist()) == set(range(10))


def test_digits_split_is_fixed_and_disjoint(digits):
    other = DigitsDataModule(**data_args("digits", batch_size=64))
    other.setup()
    assert torch.equal(digits.train_indices, other.train_indices)
    assert torch.equal(digits.val_indices, other.val_indices)
    train, val = set(digits.train_indices.tolist()), set(digits.val_indices.tolist())
    assert not train & val and len(train) + len(val) == 1797 and len(val) == 180
    reseeded = DigitsDataModule(**data_args("digits", split_seed=1))
    reseeded.setup()
    assert not torch.equal(reseeded.val_indices, digits.val_indices)


def test_digits_no_flip_by_default_and_val_loader_keeps_everything(digits):
    ds = digits.train_dataset
    assert all(torch.equal(ds[0][0], ds[0][0]) for _ in range(20))
    batches = list(digits.val_dataloader())
    assert sum(len(b[1]) for b in batches) == 180  # no drop_last on validation
    assert len(list(digits.train_dataloader())) == 1617 // 64  # drop_last on training


def test_digits_other_image_size():
    dm = DigitsDataModule(**data_args("digits", image_size=8))
    dm.setup()
    x, _ = dm.val_dataset[0]
    assert x.shape == (1, 8, 8)
    assert_on_8bit_grid(x)


def test_random_flip_on_training_only():
    dm = DigitsDataModule(**data_args("digits", random_flip=True))
    dm.setup()
    train, val = dm.train_dataset, dm.val_dataset
    i = next(i for i in range(len(train)) if not torch.equal(train.images[i], train.images[i].flip(-1)))
    plain = train.images[i].float() / 127.5 - 1
    draws = [train[i][0] for _ in range(64)]
    assert all(torch.equal(d, plain) or torch.equal(d, plain.flip(-1)) for d in draws)
    assert any(torch.equal(d, plain) for d in draws) and any(torch.equal(d, plain.flip(-1)) for d in draws)
    j = next(j for j in range(len(val)) if not torch.equal(val.images[j], val.images[j].flip(-1)))
    assert all(torch.equal(val[j][0], val.images[j].float() / 127.5 - 1) for _ in range(64))


def test_global_batch_size_is_split_across_processes():
    dm = DigitsDataModule(**data_args("digits", batch_size=128))
    dm.trainer = SimpleNamespace(world_size=2)
    dm.setup("fit")
    assert dm.batch_size_per_device == 64
    assert dm.train_dataloader().batch_size == 64
    dm = DigitsDataModule(**data_args("digits", batch_size=128))
    dm.trainer = SimpleNamespace(world_size=3)
    with pytest.raises(ValueError, match=r"128.*3"):
        dm.setup("fit")


@pytest.mark.parametrize(
    "cls, name", [(DigitsDataModule, "digits"), (CIFAR10DataModule, "cifar10"), (ImageFolderDataModule, "image_folder")]
)
def test_the_config_is_the_only_source_of_the_settings(cls, name):
    # Every setting in conf/data/<name>.yaml is an argument without a default, or a DataLoader setting passed on
    # to ImageDataModule, whose defaults are the only ones; a misspelt one is an error.
    own = inspect.signature(cls.__init__).parameters
    for key in data_args(name):
        if key in own:
            assert own[key].default is inspect.Parameter.empty, key
        else:
            assert key in ("num_workers", "pin_memory") and "loader" in own, key
    with pytest.raises(TypeError, match="num_worker"):
        cls(**data_args(name, num_worker=2, **({"root": "unused"} if "root" in own else {})))


def test_hyperparameters_include_subclass_arguments():
    dm = DigitsDataModule(**data_args("digits", image_size=12, batch_size=32))
    assert dm.hparams["image_size"] == 12 and dm.hparams["batch_size"] == 32 and dm.hparams["split_seed"] == 0


# ---------------------------------------------------------------- CIFAR-10

CIFAR_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]


def write_cifar(root: Path, per_file: int = 3, seed: int = 0) -> dict:
    """A CIFAR-10-format folder with `per_file` random images per batch file; returns the written arrays."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    written = {}
    for k, name in enumerate(CIFAR_FILES):
        data = rng.integers(0, 256, size=(per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, 10, size=per_file).tolist()
        # Python 3 re-packs have bytes keys, the official Python 2 pickles str keys; both must load.
        keys = (b"data", b"labels") if k % 2 == 0 else ("data", "labels")
        with open(folder / name, "wb") as f:
            pickle.dump({keys[0]: data, keys[1]: labels, b"batch_label": name.encode()}, f)
        written[name] = (data, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f)
    return written


def to_hwc_uint8(x: torch.Tensor) -> np.ndarray:
    v = ((x + 1) * 127.5).permute(1, 2, 0).numpy()
    assert np.allclose(v, v.round(), atol=1e-3)
    return v.round().astype(np.uint8)


def test_cifar10_reads_written_images_and_labels(tmp_path):
    written = write_cifar(tmp_path)
    dm = CIFAR10DataModule(**data_args("cifar10", root=str(tmp_path), download=False, batch_size=5, random_flip=False))
    assert (dm.channels, dm.image_size, dm.num_classes) == (3, 32, 10)
    dm.setup()
    train, val = dm.train_dataset, dm.val_dataset
    assert len(train) == 15 and len(val) == 3
    expected = np.concatenate([written[n][0] for n in CIFAR_FILES[:5]]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    expected_labels = sum((written[n][1] for n in CIFAR_FILES[:5]), [])
    for i in range(len(train)):
        x, y = train[i]
        assert x.shape == (3, 32, 32) and x.dtype == torch.float32
        assert np.array_equal(to_hwc_uint8(x), expected[i]) and y.item() == expected_labels[i]
    test_data, test_labels = written["test_batch"]
    for i in range(3):
        x, y = val[i]
        assert np.array_equal(to_hwc_uint8(x), test_data[i].reshape(3, 32, 32).transpose(1, 2, 0))
        assert y.item() == test_labels[i]
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (5, 3, 32, 32) and y.dtype == torch.int64


def test_cifar10_resize(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(**data_args("cifar10", root=str(tmp_path), download=False, image_size=16, batch_size=2))
    dm.setup()
    x, _ = dm.val_dataset[0]
    assert x.shape == (3, 16, 16)
    assert_on_8bit_grid(x)


def test_cifar10_missing_without_download(tmp_path):
    dm = CIFAR10DataModule(**data_args("cifar10", root=str(tmp_path / "empty"), download=False))
    with pytest.raises(DatasetNotFoundError) as info:
        dm.setup()
    message = str(info.value)
    assert str((tmp_path / "empty").resolve()) in message and "cifar-10-batches-py" in message
    assert "cifar-10-python.tar.gz" in message and "data.root=" in message and "\n" not in message


def test_cifar10_offline_download_gives_clear_error(tmp_path, monkeypatch):
    # Simulated offline network (deterministic, and nothing is fetched where there is internet).
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    dm = CIFAR10DataModule(**data_args("cifar10", root=str(tmp_path / "c10"), download=True))
    for step in (dm.prepare_data, dm.setup):
        with pytest.raises(DatasetNotFoundError) as info:
            step()
        message = str(info.value)
        assert "could not be downloaded" in message and "URLError" in message
        assert str((tmp_path / "c10" / "cifar-10-batches-py" / "data_batch_1").resolve()) in message
        assert "\n" not in message


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"not a pickle at all", "UnpicklingError"),
        (pickle.dumps({b"pixels": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}), "keys"),
        (pickle.dumps({b"data": np.zeros((2, 1024), np.uint8), b"labels": [0, 1]}), "3072"),
        (pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]}), "labels"),
    ],
)
def test_cifar10_corrupt_file_is_named(tmp_path, content, reason):
    write_cifar(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(content)
    dm = CIFAR10DataModule(**data_args("cifar10", root=str(tmp_path), download=False))
    with pytest.raises(DatasetNotFoundError, match=reason) as info:
        dm.setup()
    assert str(bad) in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------- image folder


def write_png(path: Path, size: tuple[int, int], color=None, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    if color is None:
        array = np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    else:
        array = np.broadcast_to(np.array(color, np.uint8), (h, w, 3))
    Image.fromarray(np.ascontiguousarray(array)).save(path)


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "images"
    sizes = [(23, 17), (40, 31), (17, 29), (50, 50), (33, 12)]
    for i, size in enumerate(sizes):
        write_png(root / "cats" / f"c{i}.png", size, seed=i)
        write_png(root / "dogs" / "nested" / f"d{i}.PNG", size, seed=10 + i)  # upper-case extension, deeper
    (root / "dogs" / "notes.txt").write_text("not an image")
    return root


def test_image_folder_shapes_labels_and_range(folder):
    dm = ImageFolderDataModule(
        **data_args("image_folder", root=str(folder), image_size=12, batch_size=4, val_fraction=0.2)
    )
    assert (dm.channels, dm.image_size, dm.num_classes) == (3, 12, 2) and dm.classes == ["cats", "dogs"]
    dm.setup()
    assert len(dm.train_dataset) == 8 and len(dm.val_dataset) == 2
    paths = dm.train_dataset.paths + dm.val_dataset.paths
    labels = torch.cat([dm.train_dataset.labels, dm.val_dataset.labels]).tolist()
    assert len(set(paths)) == 10
    assert all(label == (0 if p.parent.name == "cats" else 1) for p, label in zip(paths, labels))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 12, 12) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= -1 and x.max() <= 1
    assert_on_8bit_grid(x)


def test_image_folder_split_is_seeded(folder):
    a = ImageFolderDataModule(**data_args("image_folder", root=str(folder), val_fraction=0.2))
    b = ImageFolderDataModule(**data_args("image_folder", root=str(folder), val_fraction=0.2))
    a.setup()
    b.setup()
    assert a.val_paths == b.val_paths and not set(a.val_paths) & set(a.train_paths)
    # val_fraction 0.01 (the config's): 1% of 10 rounds to 0, still one val image
    tiny = ImageFolderDataModule(**data_args("image_folder", root=str(folder)))
    tiny.setup()
    assert len(tiny.val_dataset) == 1


def test_image_folder_center_crop(tmp_path):
    # 64x32 image: left quarter red, middle half green, right quarter blue -> the 32x32 center is green.
    array = np.zeros((32, 64, 3), np.uint8)
    array[:, :16] = (255, 0, 0)
    array[:, 16:48] = (0, 255, 0)
    array[:, 48:] = (0, 0, 255)
    Image.fromarray(array).save(tmp_path / "bands.png")
    tall = np.zeros((128, 64, 3), np.uint8)  # 64x128 -> resized to 32x64, center 32x32 is the white middle
    tall[32:96] = 255
    Image.fromarray(tall).save(tmp_path / "tall.png")
    dm = ImageFolderDataModule(
        **data_args("image_folder", root=str(tmp_path), image_size=32, val_fraction=0.0, random_flip=False)
    )
    assert dm.num_classes == 1
    dm.setup()
    images = {p.name: dm.train_dataset[i] for i, p in enumerate(dm.train_dataset.paths)}
    x, y = images["bands.png"]
    assert y.item() == 0
    assert torch.equal(x, torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32))
    x, _ = images["tall.png"]
    assert x.shape == (3, 32, 32) and (x[:, 2:-2] > 0.95).all()  # bicubic may ring at the band edges only


def test_image_folder_grayscale(folder):
    dm = ImageFolderDataModule(**data_args("image_folder", root=str(folder), image_size=8, channels=1, batch_size=2))
    assert dm.channels == 1
    dm.setup()
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 1, 8, 8)


def test_image_folder_missing_or_empty(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    (tmp_path / "empty" / "sub" / "readme.txt").write_text("no images here")
    for root in (tmp_path / "empty", tmp_path / "absent"):
        with pytest.raises(DatasetNotFoundError) as info:
            ImageFolderDataModule(**data_args("image_folder", root=str(root))).setup()
        assert str(root) in str(info.value) and ".png" in str(info.value) and ".jpg" in str(info.value)


def test_image_folder_bad_file_skip_or_error(folder, caplog):
    bad = folder / "cats" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 definitely not a jpeg")
    dm = ImageFolderDataModule(**data_args("image_folder", root=str(folder), val_fraction=0.2))
    with caplog.at_level(logging.WARNING, logger="src.data.image_folder"):
        dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 10
    assert bad not in dm.train_dataset.paths + dm.val_dataset.paths
    assert "1 unreadable" in caplog.text and str(bad) in caplog.text
    with pytest.raises(DatasetNotFoundError, match="on_bad_image=skip") as info:
        ImageFolderDataModule(**data_args("image_folder", root=str(folder), on_bad_image="error")).setup()
    assert str(bad) in str(info.value)


# ---------------------------------------------------------------- configs


@pytest.mark.parametrize("name", ["digits", "cifar10", "image_folder"])
def test_configs_instantiate(tmp_path, folder, name):
    cfg = OmegaConf.merge(
        {"paths": {"data_dir": str(tmp_path / "data")}}, {"data": OmegaConf.load(CONF_DATA / f"{name}.yaml")}
    )
    if name == "image_folder":
        cfg.data.root = str(folder)
    dm = instantiate(cfg.data)
    assert (
        type(dm).__name__
        == {"digits": "DigitsDataModule", "cifar10": "CIFAR10DataModule", "image_folder": "ImageFolderDataModule"}[name]
    )
    assert dm.channels in (1, 3) and dm.image_size > 0 and dm.num_classes >= 1
    if name == "cifar10":
        assert dm.root == str(tmp_path / "data" / "cifar10") and dm.pin_memory and dm.random_flip
    if name == "digits":
        assert not dm.random_flip and dm.num_workers == 0
