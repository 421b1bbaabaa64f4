"""The protocol evaluate.py records: disjoint seed ranges and their summary, notes on sample counts and
unequal classes, NLL with the data's labels, atomic outputs marked partial when a stop signal ends the run,
and the exit codes of Ctrl+C (130) and SIGTERM (143)."""

import json
import os
import signal
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from src.cli import run_command
from src.diffusion import GaussianDiffusion, SamplerOptions
from src.evaluation.interrupt import STOPS, sigterm_raises, stop_name
from src.evaluation.nll import nll_terms
from src.evaluation.protocol import checked_seeds, class_balance_note, image_seed_range, sample_count_notes, summary
from src.evaluation.report import Report
from src.evaluation.run import nll_conditionings
from src.sampling.batches import sample_uint8_batches


class NoiseModule:
    """Stands in for a DiffusionModule: 'samples' are the first draws of the generator it is given."""

    device = torch.device("cpu")

    def sample(self, n, options, guidance, generator=None, use_ema=True, progress=False):
        return torch.rand(n, 1, 4, 4, generator=generator) * 2 - 1


def draw(start: int, num_samples: int = 6, batch_size: int = 4) -> torch.Tensor:
    return torch.cat(
        list(sample_uint8_batches(NoiseModule(), num_samples, batch_size, SamplerOptions(), image_seed_start=start))
    )


def test_seed_ranges_are_disjoint_and_each_batch_starts_at_its_image_seed():
    assert image_seed_range(0, 6) == (0, 5) and image_seed_range(1, 6) == (6, 11) and image_seed_range(2, 6) == (12, 17)
    first, second = draw(image_seed_range(0, 6)[0]), draw(image_seed_range(1, 6)[0])
    assert not any(torch.equal(a, b) for a in first for b in second)
    # the batch starting at image i draws from a generator seeded with i: batch 2 of seed 0 starts at image 4
    expected = NoiseModule().sample(2, None, None, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        first[4:], ((expected + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), atol=1, rtol=0
    )
    torch.testing.assert_close(draw(0), first)  # reproducible
    with pytest.raises(ValueError, match="seeds must be distinct integers"):
        checked_seeds([0, 0], 0)
    assert checked_seeds(None, 3) == [3]


def test_summary_over_runs_gives_mean_std_min_max():
    runs = [{"fid": 3.0, "is": None}, {"fid": 5.0, "is": None}, {"fid": 4.0}]
    out = summary(runs, ["fid", "is"])
    assert out == {
        "fid": {
            "mean": 4.0,
            "std": pytest.approx(np.std([3.0, 5.0, 4.0])),
            "min": 3.0,
            "max": 5.0,
            "values": [3.0, 5.0, 4.0],
        }
    }


def test_notes_for_small_sample_counts_and_unequal_classes():
    assert "not comparable" in sample_count_notes(256)[0] and sample_count_notes(50_000) == []
    note = class_balance_note(torch.arange(15) % 10, 10)
    assert "unequal classes: 15 samples over 10 classes, 5 classes drawn 2 times and 5 drawn 1 times" in note
    assert class_balance_note(torch.arange(20) % 10, 10) is None


def test_report_is_written_atomically_and_marks_what_a_stop_left_missing(tmp_path):
    report = Report(tmp_path / "metrics.json", {"checkpoint": "x"})
    report.expect(["samples seed 0", "metrics seed 0", "nll"])
    report.done("samples seed 0")
    report.stopped(stop_name(KeyboardInterrupt()))
    content = json.loads((tmp_path / "metrics.json").read_text())
    assert content["partial"] is True and content["stopped_by"] == "SIGINT (Ctrl+C)"
    assert content["missing"] == ["metrics seed 0", "nll"]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]  # no temp file left behind


def test_ctrl_c_exits_130_and_sigterm_143_with_one_line(capsys):
    def interrupted(cfg):
        raise KeyboardInterrupt

    def terminated(cfg):
        with sigterm_raises():
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause()  # not reached: the handler raises

    for work, code, line in ((interrupted, 130, "interrupted (Ctrl+C)"), (terminated, 143, "stopped by a signal")):
        with pytest.raises(SystemExit) as exit_info:
            run_command(work, None)
        assert exit_info.value.code == code
        err = capsys.readouterr().err
        assert err.strip() == line and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored after the block
    assert KeyboardInterrupt in STOPS


class LabelRecorder(torch.nn.Module):
    """A net that predicts eps = 0 and records the labels it is called with."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, x, t, y=None):
        self.seen.append(None if y is None else y.clone())
        return torch.zeros_like(x)


def test_nll_of_a_conditional_net_uses_the_data_labels_when_asked():
    net = LabelRecorder()
    module = SimpleNamespace(
        ema=SimpleNamespace(model=net),
        net=net,
        device=torch.device("cpu"),
        diffusion=GaussianDiffusion(torch.linspace(0.1, 0.5, 4)),
    )
    x, y = torch.rand(3, 1, 4, 4) * 2 - 1, torch.tensor([7, 2, 5])
    nll_terms(module, [(x, y)], with_labels=True)
    assert len(net.seen) == 4 and all(torch.equal(seen, y) for seen in net.seen)
    net.seen.clear()
    nll_terms(module, [(x, y)], max_images=2, with_labels=True)
    assert all(torch.equal(seen, y[:2]) for seen in net.seen)
    net.seen.clear()
    nll_terms(module, [(x, y)])
    assert net.seen == [None] * 4


def test_nll_passes_per_kind_of_model():
    unconditional = SimpleNamespace(num_classes=None, null_label=True)
    with_null = SimpleNamespace(num_classes=10, null_label=True)
    without_null = SimpleNamespace(num_classes=10, null_label=False)
    assert [m[:2] for m in nll_conditionings(unconditional)] == [("nll", "unconditional model")]
    assert [m[0] for m in nll_conditionings(with_null)] == ["nll", "nll_null_label"]
    assert nll_conditionings(with_null)[0][2] is True and nll_conditionings(with_null)[1][2] is False
    assert [m[0] for m in nll_conditionings(without_null)] == ["nll"]
