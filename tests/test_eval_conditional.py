"""evaluate.py on a class-conditional checkpoint: NLL with the data's labels and with the null label, and a
note (log and metrics.json) when num_samples does not split equally over the classes."""

from unittest import mock

import pytest
from test_evaluate import TINY_TRAIN

from src.evaluation import run
from src.evaluation.nll import nll_terms
from src.training import train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def conditional(tmp_path_factory, compose_config):
    root = tmp_path_factory.mktemp("conditional")
    # TINY_TRAIN's net is unconditional; this one is the digits' class-conditional net
    cfg = compose_config(
        "train",
        "experiment=digits_conditional",
        *TINY_TRAIN,
        "model.num_classes=10",
        output_dir=root / "run",
        data_dir=root / "data",
    )
    train(cfg)
    return root / "run" / "checkpoints" / "last.ckpt"


def test_unequal_classes_get_a_note_and_nll_is_reported_with_and_without_labels(
    conditional, compose_evaluate, tmp_path, caplog
):
    cfg = compose_evaluate(
        f"ckpt_path={conditional}",
        "num_samples=15",
        "batch_size=15",
        "fid=false",
        "sampler=ddim",
        "steps=2",
        "guidance_scales=[0]",
        "nll=true",
        "nll_num_images=2",
        "nll_batch_size=2",
        output_dir=tmp_path / "eval",
    )
    with mock.patch("src.evaluation.run.nll_terms", wraps=nll_terms) as spy:
        metrics = run(cfg)
    assert [call.kwargs["with_labels"] for call in spy.call_args_list] == [True, False]
    notes = metrics["protocol"]["notes"]
    assert any(n.startswith("unequal classes: 15 samples over 10 classes") for n in notes)
    assert "unequal classes: 15 samples over 10 classes" in caplog.text
    assert "unequal" in metrics["guidance"]["labels"]
    assert metrics["nll"]["conditioning"] == "data labels"
    assert metrics["nll_null_label"]["conditioning"] == "null label (the unconditional model)"
    assert (tmp_path / "eval" / "nll_terms.npz").is_file() and (
        tmp_path / "eval" / "nll_terms_null_label.npz"
    ).is_file()
