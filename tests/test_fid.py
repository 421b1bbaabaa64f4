"""FID/IS: the Frechet distance math, torch-fidelity agreement, reference caching, the training callback
(single process and 2-process DDP) and its refusal to start without Inception weights.

No test downloads anything: Inception weights are written by the test itself (the extractor's own
architecture, randomly initialised), so the numbers are meaningless but exercise the real loading path.
Inception runs at a few images per second on a CPU, hence the tiny sample counts.
"""

import csv
import json
import urllib.error
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
import torch_fidelity.feature_extractor_inceptionv3 as tf_inception
from threadpoolctl import threadpool_limits
from torch import nn
from torch.utils.data import Dataset

from src.metrics import reference_stats
from src.metrics.inception import (
    INCEPTION_NAME,
    WEIGHTS_FILENAME,
    InceptionFeatures,
    MissingWeightsError,
    resolve_weights,
)
from src.metrics.reference_stats import ReferenceImages, ReferenceStats, reference_statistics
from src.metrics.scores import SampleFeatures, ScoreSettings, score
from src.metrics.statistics import FeatureStats, accumulate, fid_and_is, frechet_distance, inception_score
from src.training import train


class DigitsTrain(Dataset):
    """The default digits run's training split (the FID callback's reference)."""

    def __new__(cls):
        from src.data import DigitsDataModule

        datamodule = DigitsDataModule(image_size=16, batch_size=16, val_fraction=0.1, split_seed=0, random_flip=False)
        datamodule.setup("fit")
        return datamodule.train_dataset


def write_random_inception_weights(path: Path, seed: int = 0) -> Path:
    """torch-fidelity's Inception-v3 with random weights, saved as a state dict it loads like the real one.

    Convolutions get He-normal weights so the features keep an O(1) scale (PyTorch's default init
    shrinks them to ~1e-8 over the network's depth, which would make every FID ~0).
    """
    torch.manual_seed(seed)
    # Build the architecture without its weights (the constructor would otherwise download them).
    with (
        mock.patch.object(tf_inception, "load_state_dict_from_url", return_value={}),
        mock.patch.object(tf_inception.FeatureExtractorInceptionV3, "load_state_dict", return_value=None),
    ):
        net = tf_inception.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for module in net.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return write_random_inception_weights(tmp_path_factory.mktemp("inception") / "random-inception.pth")


@pytest.fixture(scope="module")
def extractor(weights) -> InceptionFeatures:
    return InceptionFeatures(weights)


def scipy_frechet(mu1, s1, mu2, s2) -> float:
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real))


# --- the math -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim,n", [(8, 50), (64, 300), (64, 20)])  # the last one rank-deficient
def test_frechet_distance_matches_scipy_sqrtm(dim, n):
    rng = np.random.default_rng(dim + n)
    a = rng.normal(size=(n, dim)) @ rng.normal(size=(dim, dim))
    b = rng.normal(loc=0.3, size=(n, dim)) @ rng.normal(size=(dim, dim))
    mu1, s1, mu2, s2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    expected = scipy_frechet(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6, abs=1e-6)
    # torch-fidelity's own formula agrees too
    theirs = torch_fidelity.metric_fid.fid_statistics_to_metric(
        {"mu": mu1, "sigma": s1}, {"mu": mu2, "sigma": s2}, verbose=False
    )
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(theirs["frechet_inception_distance"], rel=1e-6, abs=1e-6)


def test_frechet_distance_of_identical_and_shifted_gaussians():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 16))
    mu, s = x.mean(0), np.cov(x, rowvar=False)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-8)
    shift = np.full(16, 0.5)
    assert frechet_distance(mu, s, mu + shift, s) == pytest.approx(16 * 0.25, rel=1e-7)


def test_feature_stats_match_numpy_and_add_up_across_parts():
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.normal(loc=2.0, size=(37, 5)))
    whole = FeatureStats(5)
    whole.update(x)
    parts = [FeatureStats(5), FeatureStats(5)]
    parts[0].update(x[:20])
    parts[1].update(x[20:])
    for total, a, b in zip(whole.tensors(), *(p.tensors() for p in parts)):
        torch.testing.assert_close(total, a + b)
    mu, sigma = whole.mean_cov()
    np.testing.assert_allclose(mu, x.numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x.numpy(), rowvar=False), rtol=1e-10)


def test_inception_score_needs_a_sample_per_split():
    with pytest.raises(ValueError, match="isc_splits=10"):
        inception_score(torch.randn(4, 1008), splits=10)
    mean, std = inception_score(torch.zeros(6, 1008), splits=2)  # uniform predictions: IS = 1
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


# --- weights --------------------------------------------------------------------------------------------
def test_missing_explicit_weights_file_is_one_line_naming_it(tmp_path):
    missing = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(MissingWeightsError) as err:
        resolve_weights(missing, config_key="callbacks.fid.feature_extractor_weights_path")
    message = str(err.value)
    assert "\n" not in message and str(missing) in message
    assert "callbacks.fid.feature_extractor_weights_path" in message


def test_default_weights_offline_names_the_torch_hub_path(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    offline = mock.Mock(side_effect=urllib.error.URLError("[Errno -2] Name or service not known"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(MissingWeightsError) as err:
        resolve_weights(None)
    message = str(err.value)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / WEIGHTS_FILENAME
    assert offline.called and "\n" not in message and str(expected) in message and "URLError" in message


# --- the network and torch-fidelity -----------------------------------------------------------------------
class RGBTensors(Dataset):
    """uint8 [C, H, W] items as torch-fidelity's dataset inputs expect (3 channels)."""

    def __init__(self, images: torch.Tensor):
        self.images = images.expand(-1, 3, -1, -1)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


def test_fid_and_is_match_torch_fidelity_on_the_same_images(weights, extractor):
    gen = torch.Generator().manual_seed(0)
    fake = torch.randint(0, 256, (6, 1, 16, 16), dtype=torch.uint8, generator=gen)
    real = (torch.rand(6, 1, 16, 16, generator=gen) ** 3 * 255).to(torch.uint8)
    ref_stats, _ = accumulate(extractor, [real])
    mu, sigma = ref_stats.mean_cov()
    ours = fid_and_is(*accumulate(extractor, [fake], keep_logits=True), ReferenceStats(mu, sigma, {}), isc_splits=2)
    with threadpool_limits(limits=1, user_api="blas"):  # its 2048x2048 eigvals crawl on a busy 2-core CPU
        theirs = torch_fidelity.calculate_metrics(
            input1=RGBTensors(fake),
            input2=RGBTensors(real),
            fid=True,
            isc=True,
            isc_splits=2,
            cuda=False,
            feature_extractor_weights_path=str(weights),
            batch_size=6,
            save_cpu_ram=True,
            verbose=False,
            cache=False,
        )
    assert ours["fid"] > 0
    assert ours["fid"] == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours["is"] == pytest.approx(theirs["inception_score_mean"], rel=1e-6)
    assert ours["is_std"] == pytest.approx(theirs["inception_score_std"], rel=1e-4, abs=1e-9)


def test_grayscale_is_replicated_to_rgb(extractor):
    gray = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    pool_gray, _ = extractor(gray)
    pool_rgb, _ = extractor(gray.repeat(1, 3, 1, 1))
    torch.testing.assert_close(pool_gray, pool_rgb)
    with pytest.raises(TypeError, match="uint8"):
        extractor(gray.float())


# --- reference statistics cache ---------------------------------------------------------------------------
class FloatDataset(Dataset):
    """(x in [-1, 1], y) items with a random flip flag, like the image-folder dataset."""

    def __init__(self, images: torch.Tensor):
        self.images_u8, self.random_flip = images, True

    def __len__(self):
        return len(self.images_u8)

    def __getitem__(self, i):
        x = self.images_u8[i].float() / 127.5 - 1
        return (x.flip(-1) if self.random_flip else x), 0


def test_reference_images_are_exact_and_never_flipped():
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    ref = ReferenceImages(FloatDataset(images), num_images=3)
    assert len(ref) == 3
    torch.testing.assert_close(ref.batch([0, 1, 2]), images[:3])


def test_reference_statistics_are_cached_with_a_description(tmp_path, extractor):
    from src.data import UInt8ImageDataset

    images = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    real = ReferenceImages(UInt8ImageDataset(images, torch.zeros(5)), num_images=4)
    spy = mock.Mock(wraps=accumulate)
    with mock.patch.object(reference_stats, "accumulate", spy):
        first = reference_statistics(extractor, real, "digits", "train", tmp_path, batch_size=4)
        second = reference_statistics(extractor, real, "digits", "train", tmp_path, batch_size=4)
    assert spy.call_count == 1  # the second call read the cache
    np.testing.assert_array_equal(first.sigma, second.sigma)
    (path,) = tmp_path.glob("*.npz")
    assert path.name.startswith("digits-train-8px-4-")
    with np.load(path) as data:
        meta = json.loads(str(data["meta"]))
    assert meta["num_images"] == 4 and meta["split"] == "train" and meta["dataset"] == "digits"
    assert "reference features" in meta["description"] and meta["extractor"] == "inception-v3-compat"
    assert meta["weights_sha256_prefix"] == extractor.fingerprint
    with np.load(path) as data:  # the rows themselves, for KID and precision / recall
        np.testing.assert_allclose(data["features"].mean(0), first.mu, rtol=1e-5, atol=1e-6)
    # other images of the same size and count -> another cache entry, not a stale hit
    other = ReferenceImages(UInt8ImageDataset(255 - images, torch.zeros(5)), num_images=4)
    reference_statistics(extractor, other, "digits", "train", tmp_path, batch_size=4)
    assert len(list(tmp_path.glob("*.npz"))) == 2


# --- the training callback ------------------------------------------------------------------------------
def fid_overrides(weights: Path, tmp_path: Path, *extra: str) -> list[str]:
    return [
        "callbacks=fid",
        "sampler.steps=10",
        f"callbacks.fid.feature_extractor_weights_path={weights}",
        "callbacks.fid.num_samples=4",
        "callbacks.fid.batch_size=4",
        "callbacks.fid.isc_splits=2",
        "callbacks.fid.num_reference_images=6",
        f"callbacks.fid.cache_dir={tmp_path}/fid_stats",
        *extra,
    ]


@pytest.mark.slow
def test_fid_callback_refuses_to_start_without_weights(compose_train, tmp_path):
    missing = tmp_path / "no-such-weights.pth"
    cfg = compose_train(
        "callbacks=fid", f"callbacks.fid.feature_extractor_weights_path={missing}", "trainer.max_steps=2"
    )
    with pytest.raises(MissingWeightsError) as err:
        train(cfg)
    assert "\n" not in str(err.value) and str(missing) in str(err.value)


@pytest.mark.slow
def test_fid_callback_logs_fid_and_is_once_per_step(compose_train, tmp_path, weights):
    cfg = compose_train(
        *fid_overrides(
            weights,
            tmp_path,
            "callbacks.sample_grid=null",
            "trainer.max_steps=2",
            "callbacks.fid.every_n_steps=2",
            "trainer.log_every_n_steps=1",
        )
    )
    metrics_out, objects = train(cfg)
    assert {"eval/fid", "eval/is", "eval/is_std"} <= metrics_out.keys()
    assert np.isfinite(metrics_out["eval/fid"]) and metrics_out["eval/fid"] > 0
    callback = next(c for c in objects["trainer"].callbacks if type(c).__name__ == "FIDCallback")
    assert callback.last_metrics["num_samples"] == 4 and callback.last_metrics["step"] == 2
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    fid_rows = [r for r in rows if r.get("eval/fid")]
    assert len(fid_rows) == 1 and fid_rows[0]["step"] == "2"  # the end-of-training evaluation is not repeated
    assert len(list((tmp_path / "fid_stats").glob("digits-train-16px-6-*.npz"))) == 1


@pytest.mark.slow
def test_fid_callback_under_ddp_equals_one_process_on_the_same_samples(compose_train, tmp_path, weights, extractor):
    """2 CPU processes (gloo): 5 samples shared 3 + 2 with seeds 0 and 1, gathered, metrics computed once."""
    cfg = compose_train(
        *fid_overrides(
            weights,
            tmp_path,
            "callbacks.sample_grid=null",
            "trainer.max_steps=1",
            "callbacks.fid.num_samples=5",
            "callbacks.fid.metrics=[fid,is,kid,prc]",
            "callbacks.fid.kid_subset_size=4",
            "callbacks.fid.kid_subsets=3",
            "trainer.devices=2",
            "+trainer.strategy=ddp_spawn",
            "callbacks.fid.save_samples=true",
            f"callbacks.fid.samples_dir={tmp_path}/fid_samples",
        )
    )
    metrics_out, _ = train(cfg)
    with np.load(tmp_path / "fid_samples" / "fid_samples_step_0000001.npz") as data:
        samples = torch.from_numpy(data["arr_0"]).permute(0, 3, 1, 2)
    assert samples.shape == (5, 1, 16, 16) and samples.dtype == torch.uint8
    assert not torch.equal(samples[:2], samples[3:5])  # rank 1 drew other noise than rank 0
    (cache,) = (tmp_path / "fid_stats").glob("*.npz")
    with np.load(cache) as data:
        reference = ReferenceStats(data["mu"], data["sigma"], {}, features=data["features"])
    assert reference.features.shape == (6, 2048)  # gathered from both processes, in the images' order
    _, _, rows = accumulate(extractor, [ReferenceImages(DigitsTrain(), 6).batch(range(6))], keep_features=True)
    np.testing.assert_allclose(reference.features, rows.numpy(), rtol=1e-5, atol=1e-5)
    single = fid_and_is(*accumulate(extractor, [samples], keep_logits=True), reference, isc_splits=2)
    stats, logits, sample_rows = accumulate(extractor, [samples], keep_logits=True, keep_features=True)
    settings = ScoreSettings.checked(["kid", "prc"], kid_subsets=3, kid_subset_size=4)
    more, _ = score(SampleFeatures(stats, logits, sample_rows), reference, settings, INCEPTION_NAME)
    for key in ("kid", "kid_std", "precision", "recall"):
        assert metrics_out[f"eval/{key}"] == pytest.approx(more[key], rel=1e-4, abs=1e-6), key
    assert metrics_out["eval/fid"] == pytest.approx(single["fid"], rel=1e-5)
    assert metrics_out["eval/is"] == pytest.approx(single["is"], rel=1e-6)
    assert metrics_out["eval/is_std"] == pytest.approx(single["is_std"], rel=1e-4, abs=1e-9)
    # a second distributed run reads the cached reference statistics instead of recomputing them
    written = cache.stat().st_mtime_ns
    cfg.overwrite = True  # the same run folder again, on purpose
    metrics_again, _ = train(cfg)
    assert cache.stat().st_mtime_ns == written and np.isfinite(metrics_again["eval/fid"])


def test_fid_callback_draws_every_class_equally_often_over_all_processes(compose_train):
    from hydra.utils import instantiate

    from src.callbacks.fid import share

    cfg = compose_train("callbacks=fid", "callbacks.fid.extractor=digits", "guidance_scale=1.5")
    callback = instantiate(cfg.callbacks.fid)
    counts = [share(8, 3, r) for r in range(3)]  # 3, 3, 2
    parts = [callback._labels(3, counts, r) for r in range(3)]
    assert torch.cat([labels for labels, _ in parts]).tolist() == [0, 1, 2, 0, 1, 2, 0, 1]
    assert all(guidance.scale == 1.5 for _, guidance in parts)
    assert callback._labels(None, counts, 0)[0] is None  # unconditional nets: no labels


@pytest.mark.slow
def test_fid_callback_with_the_digits_extractor_logs_named_curves(compose_train, tmp_path):
    # the digits default's class-conditional net (the fast test config is unconditional)
    cfg = compose_train(
        "model.num_classes=10",
        "callbacks=fid",
        "sampler.steps=5",
        "callbacks.fid.extractor=digits",
        "callbacks.fid.metrics=[fid,is,kid,prc]",
        "callbacks.fid.num_samples=8",
        "callbacks.fid.batch_size=8",
        "callbacks.fid.isc_splits=2",
        "callbacks.fid.reference=judge",
        f"callbacks.fid.cache_dir={tmp_path}/fid_stats",
        "callbacks.sample_grid=null",
        "trainer.max_steps=2",
        "callbacks.fid.every_n_steps=2",
        "trainer.log_every_n_steps=1",
    )
    metrics_out, _ = train(cfg)
    expected = {f"eval/{m}_digits-mlp64" for m in ("fd", "is", "is_std", "kid", "kid_std", "precision", "recall")}
    assert expected <= metrics_out.keys() and "eval/fid" not in metrics_out
    with open(Path(cfg.paths.output_dir) / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/fd_digits-mlp64")]
    assert len(rows) == 1 and float(rows[0]["eval/fd_digits-mlp64"]) > 0
    assert len(list((tmp_path / "fid_stats").glob("digits-judge-reference-16px-500-*.npz"))) == 1
