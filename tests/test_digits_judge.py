"""The digits judge (src/metrics/digits_judge.py, benchmarks/digits_sample_quality.py): its parts
are disjoint, its network is the fitted scikit-learn MLP, and it is a usable yardstick: real held-out
digits score near its floor and visibly worse images clearly worse."""

import json

import numpy as np
import pytest
import torch

from benchmarks.digits_sample_quality import DigitsJudge, blurred, main
from src.metrics.digits_judge import (
    CLASSIFIER_IMAGES,
    REFERENCE_IMAGES,
    DigitsFeatures,
    fit_classifier,
    flatten_unit,
    judge_indices,
    judge_split,
)

SIZE = 16


@pytest.fixture(scope="module")
def judge():
    return DigitsJudge(SIZE)


def test_the_parts_partition_all_digits_and_do_not_depend_on_the_size():
    fit, ref, held = judge_indices(1797)
    assert (len(fit), len(ref), len(held)) == (
        CLASSIFIER_IMAGES,
        REFERENCE_IMAGES,
        1797 - CLASSIFIER_IMAGES - REFERENCE_IMAGES,
    )
    assert torch.equal(torch.sort(torch.cat([fit, ref, held])).values, torch.arange(1797))
    small, large = judge_split(8), judge_split(SIZE)
    assert torch.equal(small.held_out_labels, large.held_out_labels)


def test_the_network_is_the_fitted_mlp(judge):
    images = judge_split(SIZE).held_out[:50]
    features, logits = judge.extractor(images)
    classifier = fit_classifier(SIZE)
    expected_features = np.maximum(flatten_unit(images) @ classifier.coefs_[0] + classifier.intercepts_[0], 0.0)
    np.testing.assert_allclose(features.numpy(), expected_features, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(
        torch.softmax(logits.double(), 1).numpy(), classifier.predict_proba(flatten_unit(images)), atol=1e-5
    )
    assert judge.extractor.accuracy > 0.95


def test_real_digits_score_near_the_floor_and_worse_images_clearly_worse(judge):
    floor, blur = (row for _, row in judge.real_rows())
    noise = torch.randint(
        0, 256, (REFERENCE_IMAGES, 1, SIZE, SIZE), generator=torch.Generator().manual_seed(0), dtype=torch.uint8
    )
    uniform = judge.score(noise)
    assert floor["digit_is"] > 9.0 and blur["digit_is"] < floor["digit_is"]
    assert 3 * floor["fd"] < blur["fd"] < uniform["fd"]
    assert 5 * floor["kid_x1000"] < blur["kid_x1000"] < uniform["kid_x1000"]


def test_a_wrong_image_size_is_refused():
    with pytest.raises(ValueError, match="fitted at 16x16"):
        DigitsFeatures(SIZE)(torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_blurring_averages_a_five_pixel_wide_cross():
    image = torch.zeros(1, 1, 7, 7, dtype=torch.uint8)
    image[0, 0, 3, 3] = 180
    out = blurred(image)[0, 0]
    assert out[3, 3] == 20 and out[3, 1] == 20 and out[1, 3] == 20 and out[2, 2] == 0 and out.sum() == 180


def test_the_script_scores_an_npz_like_the_floor_row(judge, tmp_path, capsys):
    held = judge_split(SIZE).held_out
    np.savez(tmp_path / "real.npz", arr_0=held.permute(0, 2, 3, 1).numpy())
    main([str(tmp_path / "real.npz"), "--json", str(tmp_path / "out.json")])
    rows = json.loads((tmp_path / "out.json").read_text())["rows"]
    assert rows[2]["fd"] == pytest.approx(rows[0]["fd"]) and rows[2]["n"] == REFERENCE_IMAGES
    assert "real held-out digits (floor)" in capsys.readouterr().out


def test_the_script_refuses_fewer_images_than_it_compares(tmp_path):
    np.savez(tmp_path / "few.npz", arr_0=np.zeros((10, SIZE, SIZE, 1), np.uint8))
    with pytest.raises(SystemExit, match="num_samples=500"):
        main([str(tmp_path / "few.npz")])
