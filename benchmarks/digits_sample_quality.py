"""Sample quality of a digits model without the Inception network, with the project's digits judge
(src/metrics/digits_judge.py: an MLP digit classifier fitted on 797 of the 1797 digits).

    python benchmarks/digits_sample_quality.py outputs/evaluate/.../samples_500x16x16x1.npz [more.npz ...] [--json out.json]

Every set is scored against the judge's 500 reference digits, at 500 images (the first 500 of each npz:
FD falls with the image count, so only equal counts compare). For each npz written by evaluate.py
(uint8 NHWC, key arr_0; optional labels arr_1) it prints:
- FD: the Frechet distance of the classifier's hidden features of the images and of the reference;
- KID x 1000: torch-fidelity's kernel distance of the same features (unbiased; 0 for the same distribution),
  100 subsets of 250;
All numbers come from evaluate.py's own scoring (src.metrics.scores), so `evaluate.py extractor=digits` gives
the same FD and precision / recall on the same file.
- digit IS: exp(E_x KL(p(y|x) || p(y))) of the classifier over the whole set (10 = confident and all classes
  equally often);
- precision / recall: improved precision and recall (k = 3) in the same features;
- confidence: the mean max_y p(y|x);
- class agreement, for class-conditional samples: how often the classifier names the class drawn for.
Two rows of real images come first: the 500 held-out digits (the floor a perfect model reaches) and the
same digits blurred by a cross filter 5 pixels wide (a visibly worse "model"), so each number can be read
between the two.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.metrics.digits_judge import REFERENCE_IMAGES, DigitsFeatures, judge_split
from src.metrics.extractors import metric_key
from src.metrics.reference_stats import ReferenceStats
from src.metrics.scores import SampleFeatures, ScoreSettings, score
from src.metrics.statistics import FeatureStats

COUNT = REFERENCE_IMAGES  # images scored per set
# evaluate.py's metrics (src.metrics.scores), with the digit IS over the whole set (one split) and KID on
# subsets of half the set (of all of it, for sets smaller than that).
SETTINGS = ScoreSettings(metrics=("fid", "is", "kid", "prc"), isc_splits=1, kid_subset_size=COUNT // 2)


def blurred(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 1, H, W] averaged over a cross 5 pixels wide (the pixel and 2 neighbours each way)."""
    kernel = torch.zeros(1, 1, 5, 5)
    kernel[0, 0, 2, :] = kernel[0, 0, :, 2] = 1.0 / 9.0
    x = F.conv2d(F.pad(images.float(), (2, 2, 2, 2), mode="replicate"), kernel)
    return x.round().clamp(0, 255).to(torch.uint8)


class DigitsJudge:
    """Scores uint8 digits [N, 1, S, S] against the judge's reference part (see the module docstring)."""

    def __init__(self, image_size: int):
        self.extractor, self.split = DigitsFeatures(image_size), judge_split(image_size)
        features, _ = self.extractor(self.split.reference)
        ref = features.double().numpy()
        self.reference = ReferenceStats(
            mu=ref.mean(0), sigma=np.cov(ref, rowvar=False), meta={"reference": "judge"}, features=ref
        )

    def score(self, images: torch.Tensor, labels: np.ndarray | None = None) -> dict:
        features, logits = self.extractor(images)
        stats = FeatureStats(dim=features.shape[1])
        stats.update(features)
        settings = dataclasses.replace(SETTINGS, kid_subset_size=min(SETTINGS.kid_subset_size, len(images)))
        values, _ = score(SampleFeatures(stats, logits, features), self.reference, settings, self.extractor.name)
        value = lambda metric: values[metric_key(metric, self.extractor.name)]  # noqa: E731
        probs = torch.softmax(logits.double(), dim=1).numpy()
        agreement = None if labels is None else float((probs.argmax(1) == labels).mean())
        return {
            "n": len(images),
            "fd": value("fd"),
            "kid_x1000": 1000 * value("kid"),
            "digit_is": value("is"),
            "precision": value("precision"),
            "recall": value("recall"),
            "confidence": float(probs.max(1).mean()),
            "class_agreement": agreement,
        }

    def real_rows(self) -> list[tuple[str, dict]]:
        """The floor (held-out real digits) and a visibly worse set (the same digits blurred)."""
        return [
            ("real held-out digits (floor)", self.score(self.split.held_out)),
            ("real held-out digits, blurred", self.score(blurred(self.split.held_out))),
        ]


def load_npz(path: Path) -> tuple[torch.Tensor, np.ndarray | None]:
    """(uint8 [N, 1, H, W] images, labels or None)."""
    with np.load(path) as data:
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1 or images.shape[1] != images.shape[2]:
        raise SystemExit(
            f"error: {path} is not a uint8 NHWC npz of square 1-channel images (evaluate.py on a digits run)"
        )
    if len(images) < COUNT:
        raise SystemExit(
            f"error: {path} holds {len(images)} images; the judge scores {COUNT} (evaluate.py num_samples={COUNT})"
        )
    images = torch.from_numpy(images[:COUNT]).permute(0, 3, 1, 2).contiguous()
    return images, None if labels is None else labels[:COUNT]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("npz", nargs="*", type=Path)
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--image-size", type=int, default=16, help="size of the real rows when no npz is given")
    args = parser.parse_args(argv)
    samples = {path: load_npz(path) for path in args.npz}
    sizes = {images.shape[-1] for images, _ in samples.values()} or {args.image_size}
    if len(sizes) != 1:
        raise SystemExit(
            f"error: the npz files hold images of different sizes {sorted(sizes)}; score one size at a time"
        )
    size = sizes.pop()
    judge = DigitsJudge(size)
    rows = judge.real_rows() + [(str(path), judge.score(images, labels)) for path, (images, labels) in samples.items()]
    print(
        f"digits judge {judge.extractor.name} at {size}x{size} (held-out accuracy "
        f"{100 * judge.extractor.accuracy:.1f}%), {COUNT} images per row against {len(judge.split.reference)} "
        "reference digits"
    )
    print(
        "| images | n | FD (digit features) | KID x 1000 | digit IS | precision | recall | confidence | class agreement |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        agreement = "" if s["class_agreement"] is None else f"{100 * s['class_agreement']:.1f}%"
        print(
            f"| {name} | {s['n']} | {s['fd']:.2f} | {s['kid_x1000']:.2f} | {s['digit_is']:.2f} | "
            f"{s['precision']:.3f} | {s['recall']:.3f} | {s['confidence']:.3f} | {agreement} |"
        )
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "extractor": judge.extractor.name,
                    "image_size": size,
                    "rows": [{"images": name, **s} for name, s in rows],
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
