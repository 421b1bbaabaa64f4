"""reference=: an npz of mu / sigma, an npz of images and an image folder of the same images give the same
FID as statistics computed from them; samples=<file.npz> is scored without a checkpoint; the cache key
covers the extractor; bad references are one-line errors that name the fix."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from src.errors import ConfigError
from src.evaluation import run
from src.evaluation.scoring import Scorer
from src.metrics.digits_judge import judge_split
from src.metrics.references import default_spec, resolve_source
from src.metrics.statistics import accumulate, frechet_distance
from src.sampling.batches import load_npz

pytestmark = pytest.mark.usefixtures("single_thread")


def nhwc(images: torch.Tensor) -> np.ndarray:
    return images.permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def split():
    return judge_split(16)


def score_against(compose_evaluate, tmp_path, reference: str, samples: torch.Tensor, *overrides: str) -> dict:
    cfg = compose_evaluate("extractor=digits", f"reference={reference}", f"cache_dir={tmp_path}/cache", *overrides)
    return Scorer(cfg, tuple(samples.shape[1:]), torch.device("cpu"), split_dataset=None)(samples)


def test_mu_sigma_npz_image_npz_and_folder_give_the_fid_of_the_statistics(compose_evaluate, tmp_path, split):
    real, fake = split.reference[:200], split.held_out[:200]
    scorer = Scorer(compose_evaluate("extractor=digits", "reference=judge"), (1, 16, 16), torch.device("cpu"), None)
    scorer(fake[:20])  # builds the extractor
    ref_stats, _ = accumulate(scorer.extractor, [real])
    fake_stats, _ = accumulate(scorer.extractor, [fake])
    expected = frechet_distance(*fake_stats.mean_cov(), *ref_stats.mean_cov())
    mu, sigma = ref_stats.mean_cov()
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    np.savez(tmp_path / "images.npz", arr_0=nhwc(real))
    folder = tmp_path / "folder"
    folder.mkdir()
    for i, image in enumerate(real):
        Image.fromarray(image[0].numpy()).save(folder / f"{i:04d}.png")
    results = {
        spec: score_against(compose_evaluate, tmp_path, spec, fake)
        for spec in (tmp_path / "stats.npz", tmp_path / "images.npz", folder)
    }
    for spec, entry in results.items():
        assert entry["fd_digits-mlp64"] == pytest.approx(expected, rel=1e-9), spec
    # only images give KID and precision / recall; mu / sigma say they need images
    by_stats = results[tmp_path / "stats.npz"]
    assert (
        by_stats["kid_digits-mlp64"] is None
        and "needs the reference images" in by_stats["metrics_unavailable"]["kid_digits-mlp64"]
    )
    assert by_stats["reference"]["split"] == "mu/sigma" and len(by_stats["reference"]["sha256_prefix"]) == 16
    assert results[folder]["kid_digits-mlp64"] == pytest.approx(results[tmp_path / "images.npz"]["kid_digits-mlp64"])


def test_samples_npz_is_scored_without_a_checkpoint_against_the_judge(compose_evaluate, tmp_path, split):
    path = tmp_path / "held_out.npz"
    np.savez(path, arr_0=nhwc(split.held_out), arr_1=split.held_out_labels.numpy())
    out = tmp_path / "eval"
    metrics = run(
        compose_evaluate(f"samples={path}", "extractor=digits", f"cache_dir={tmp_path}/cache", output_dir=out)
    )
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert metrics["protocol"]["reference"] == "judge" and metrics["protocol"]["extractor"] == "digits-mlp64"
    assert metrics["samples"]["num_samples"] == 500 and sum(metrics["samples"]["labels_per_class"]) == 500
    assert metrics["precision_digits-mlp64"] >= 0.7 and metrics["recall_digits-mlp64"] >= 0.7
    assert metrics["is_digits-mlp64"] > 5 and "not comparable" in metrics["protocol"]["notes"][0]
    assert "partial" not in metrics
    # one feature network: the benchmark script gives the same file the same FD
    from benchmarks.digits_sample_quality import DigitsJudge

    assert metrics["fd_digits-mlp64"] == pytest.approx(DigitsJudge(16).score(split.held_out)["fd"], rel=1e-6)


def test_cache_key_covers_the_extractor(tmp_path, split):
    from src.data import UInt8ImageDataset
    from src.metrics.reference_stats import ReferenceImages, reference_meta

    images = ReferenceImages(UInt8ImageDataset(split.reference, torch.zeros(500)))

    class Fake:
        name, fingerprint = "digits-mlp64", "aaaa"

    meta = reference_meta("digits-judge", "reference", images, Fake())
    other = dict(meta, extractor="inception-v3-compat")
    assert meta["extractor"] == "digits-mlp64" and meta["weights_sha256_prefix"] == "aaaa" and meta != other
    assert meta["num_images"] == 500 and meta["image_size"] == 16 and meta["split"] == "reference"


def test_bad_references_and_sample_files_are_one_line_errors(tmp_path, split):
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    np.savez(tmp_path / "rgb.npz", arr_0=np.zeros((4, 32, 32, 3), np.uint8))
    np.savez(tmp_path / "floats.npz", arr_0=np.zeros((4, 16, 16, 1), np.float32))
    (tmp_path / "empty").mkdir()
    shape = (1, 16, 16)
    cases = [
        ("train", "is a split of the checkpoint's data; give ckpt_path"),
        (str(tmp_path / "other.npz"), "neither arr_0 (images) nor mu and sigma"),
        (str(tmp_path / "rgb.npz"), "holds 3x32x32 images but the samples are 1x16x16"),
        (str(tmp_path / "floats.npz"), "arr_0 must be uint8 images"),
        (str(tmp_path / "empty"), "no images"),
        (str(tmp_path / "missing.npz"), "not train, val, judge, an image folder or an existing .npz"),
    ]
    for spec, message in cases:
        with pytest.raises(ConfigError, match=re.escape(message)) as err:
            resolve_source(spec, shape, None, split_dataset=None)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="need a reference: give reference="):
        default_spec(None, has_checkpoint=False, image_shape=(3, 64, 64))
    assert default_spec(None, has_checkpoint=False, image_shape=(1, 16, 16)) == "judge"
    assert default_spec(None, has_checkpoint=True, image_shape=(3, 64, 64)) == "train"
    with pytest.raises(ConfigError, match="no such file"):
        load_npz(tmp_path / "nowhere.npz")
    with pytest.raises(ConfigError, match="has no arr_0"):
        load_npz(tmp_path / "other.npz")
