"""Sample-quality metrics beyond FID: KID and precision / recall equal torch-fidelity's on the same images
and (test-written, random) Inception weights; the digits extractor separates real digits from noise; every
number is named after its extractor; the settings are checked."""

import pytest
import torch
import torch_fidelity
from test_fid import RGBTensors, write_random_inception_weights
from threadpoolctl import threadpool_limits

from src.data import DigitsDataModule
from src.errors import ConfigError
from src.evaluation.scoring import Scorer
from src.metrics.digits_judge import DIGITS_EXTRACTOR_NAME, judge_split
from src.metrics.extractors import ExtractorRequest, build_extractor, metric_key
from src.metrics.inception import INCEPTION_NAME, InceptionFeatures
from src.metrics.reference_stats import ReferenceStats
from src.metrics.scores import SampleFeatures, ScoreSettings, score
from src.metrics.statistics import accumulate

pytestmark = pytest.mark.usefixtures("single_thread")


def features_of(extractor, images: torch.Tensor, rows: bool = True) -> SampleFeatures:
    stats, logits, feats = accumulate(extractor, [images], keep_logits=True, keep_features=True)
    return SampleFeatures(stats=stats, logits=logits, rows=feats if rows else None)


def reference_of(extractor, images: torch.Tensor) -> ReferenceStats:
    stats, _, rows = accumulate(extractor, [images], keep_features=True)
    mu, sigma = stats.mean_cov()
    return ReferenceStats(mu=mu, sigma=sigma, meta={}, features=rows.numpy())


def test_kid_and_precision_recall_match_torch_fidelity(tmp_path):
    weights = write_random_inception_weights(tmp_path / "random-inception.pth")
    extractor = InceptionFeatures(weights)
    gen = torch.Generator().manual_seed(0)
    fake = torch.randint(0, 256, (10, 1, 16, 16), dtype=torch.uint8, generator=gen)
    real = (torch.rand(10, 1, 16, 16, generator=gen) ** 3 * 255).to(torch.uint8)
    settings = ScoreSettings.checked(["kid", "prc"], kid_subsets=5, kid_subset_size=6)
    ours, unavailable = score(features_of(extractor, fake), reference_of(extractor, real), settings, INCEPTION_NAME)
    assert unavailable == {}
    with threadpool_limits(limits=1, user_api="blas"):
        theirs = torch_fidelity.calculate_metrics(
            input1=RGBTensors(fake),
            input2=RGBTensors(real),
            kid=True,
            prc=True,
            kid_subsets=5,
            kid_subset_size=6,
            feature_extractor="inception-v3-compat",
            cuda=False,
            feature_extractor_weights_path=str(weights),
            batch_size=10,
            save_cpu_ram=True,
            verbose=False,
            cache=False,
        )
    assert ours["kid"] == pytest.approx(theirs["kernel_inception_distance_mean"], rel=1e-4, abs=1e-4)
    assert ours["kid_std"] == pytest.approx(theirs["kernel_inception_distance_std"], rel=1e-4, abs=1e-4)
    assert ours["precision"] == pytest.approx(theirs["precision"], abs=1e-4)
    assert ours["recall"] == pytest.approx(theirs["recall"], abs=1e-4)
    assert ours["kid"] != 0 and 0 <= ours["precision"] <= 1


@pytest.fixture(scope="module")
def digits():
    return build_extractor("digits", ExtractorRequest(image_shape=(1, 16, 16)))


def test_real_digits_score_near_the_validation_split_and_noise_does_not(digits):
    datamodule = DigitsDataModule(image_size=16, batch_size=64, val_fraction=0.1, split_seed=0, random_flip=False)
    datamodule.setup("fit")
    reference = reference_of(digits, datamodule.val_dataset.images)
    settings = ScoreSettings.checked(["fid", "is", "kid", "prc"])
    real = datamodule.train_dataset.images[:500]
    noise = torch.randint(0, 256, real.shape, dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    good, _ = score(features_of(digits, real), reference, settings, DIGITS_EXTRACTOR_NAME)
    bad, _ = score(features_of(digits, noise), reference, settings, DIGITS_EXTRACTOR_NAME)
    key = lambda m: metric_key(m, DIGITS_EXTRACTOR_NAME)  # noqa: E731
    assert good[key("precision")] >= 0.7 and good[key("recall")] >= 0.7
    assert good[key("kid")] < 0.1 * bad[key("kid")]
    assert good[key("fd")] < 0.1 * bad[key("fd")] and good[key("is")] > 5 > bad[key("is")]
    assert bad[key("precision")] < 0.3


def test_numbers_are_named_after_their_extractor():
    assert [metric_key(m, INCEPTION_NAME) for m in ("fd", "is", "kid", "precision")] == [
        "fid",
        "is",
        "kid",
        "precision",
    ]
    assert metric_key("fd", DIGITS_EXTRACTOR_NAME) == "fd_digits-mlp64"
    assert metric_key("recall", DIGITS_EXTRACTOR_NAME) == "recall_digits-mlp64"


def test_kid_and_precision_recall_need_reference_images(digits):
    images = judge_split(16).held_out[:50]
    rows_free = ReferenceStats(**{k: v for k, v in vars(reference_of(digits, images)).items() if k != "features"})
    settings = ScoreSettings.checked(["fid", "kid", "prc"], kid_subset_size=20)
    values, unavailable = score(features_of(digits, images), rows_free, settings, DIGITS_EXTRACTOR_NAME)
    assert values["fd_digits-mlp64"] == pytest.approx(0.0, abs=1e-6)
    assert set(unavailable) == {"kid_digits-mlp64", "prc_digits-mlp64"}
    assert all("mu / sigma only" in why and "\n" not in why for why in unavailable.values())
    # a subset larger than the sets is reported, not a crash
    settings = ScoreSettings.checked(["kid"], kid_subset_size=80)
    _, unavailable = score(features_of(digits, images), reference_of(digits, images), settings, DIGITS_EXTRACTOR_NAME)
    assert "lower kid_subset_size" in unavailable["kid_digits-mlp64"]


@pytest.mark.parametrize(
    "metrics,values,message",
    [
        (["fid", "lpips"], {}, "choose from"),
        ([], {}, "choose from"),
        (["kid"], {"kid_subsets": 0}, "kid_subsets must be a positive"),
    ],
)
def test_bad_metric_settings_are_one_line_config_errors(metrics, values, message):
    with pytest.raises(ConfigError, match=message):
        ScoreSettings.checked(metrics, **values)


def test_unknown_extractor_and_wrong_images_for_digits_are_config_errors():
    with pytest.raises(ConfigError, match="unknown extractor 'vgg'; use one of inception, digits"):
        build_extractor("vgg", ExtractorRequest(image_shape=(1, 16, 16)))
    with pytest.raises(ConfigError, match="extractor=digits scores square 1-channel images"):
        build_extractor("digits", ExtractorRequest(image_shape=(3, 32, 32)))


def test_scorer_labels_every_entry_with_extractor_and_reference(compose_evaluate, tmp_path):
    cfg = compose_evaluate("extractor=digits", "reference=judge", "metrics=[fid,kid]", f"cache_dir={tmp_path}/cache")
    scorer = Scorer(cfg, (1, 16, 16), torch.device("cpu"), split_dataset=None)
    entry = scorer(judge_split(16).held_out)
    assert entry["extractor"]["name"] == "digits-mlp64" and entry["reference"]["spec"] == "judge"
    assert entry["reference"]["dataset"] == "digits-judge" and entry["reference"]["num_images"] == 500
    assert {"fd_digits-mlp64", "kid_digits-mlp64", "kid_std_digits-mlp64"} <= entry.keys()
    assert "fid" not in entry and "kid" not in entry  # nothing reads as an Inception number
    assert len(list((tmp_path / "cache").glob("digits-judge-reference-16px-500-*.npz"))) == 1
