"""Sample quality of a digits model without the Inception network: a small MLP digit classifier
trained on the training split stands in for Inception-v3 (as MNIST papers do with a LeNet).

    python benchmarks/digits_sample_quality.py outputs/evaluate/.../samples_256x16x16x1.npz [more.npz ...]

For each npz written by evaluate.py (uint8 NHWC, key arr_0) it prints:
- FD: the Frechet distance between the classifier's hidden features of the samples and of the
  training images (lower is better);
- digit IS: exp(E_x KL(p(y|x) || p(y))) of the classifier (10 = confident and all classes equally
  often, 1 = no information);
- confidence: the mean max_y p(y|x);
- class agreement, for class-conditional samples (npz with `arr_1` labels): how often the classifier
  names the class a sample was drawn for.
The first row scores the 180 held-out validation images the same way: the floor a perfect model
would reach with that many images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sklearn.neural_network import MLPClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from src.evaluation.metrics import frechet_distance  # noqa: E402


def digits_split(image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train images, train labels, val images) of the default digits split, flattened to [0, 1]."""
    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "data" / "digits.yaml")
    datamodule = instantiate(config, image_size=image_size)  # the training split, as train.py makes it
    datamodule.setup("fit")
    flat = lambda ds: ds.images.reshape(len(ds), -1).numpy().astype(np.float64) / 255.0  # noqa: E731
    return flat(datamodule.train_dataset), datamodule.train_dataset.labels.numpy(), flat(datamodule.val_dataset)


def hidden_features(classifier: MLPClassifier, x: np.ndarray) -> np.ndarray:
    return np.maximum(x @ classifier.coefs_[0] + classifier.intercepts_[0], 0.0)


def scores(classifier: MLPClassifier, x: np.ndarray, reference: tuple[np.ndarray, np.ndarray],
           labels: np.ndarray | None = None) -> dict:
    features = hidden_features(classifier, x)
    fd = frechet_distance(features.mean(0), np.cov(features, rowvar=False), *reference)
    probs = classifier.predict_proba(x)
    marginal = probs.mean(0, keepdims=True)
    kl = (probs * (np.log(probs + 1e-12) - np.log(marginal + 1e-12))).sum(1)
    agreement = None if labels is None else float((classifier.classes_[probs.argmax(1)] == labels).mean())
    return {"n": len(x), "fd": fd, "digit_is": float(np.exp(kl.mean())), "confidence": float(probs.max(1).mean()),
            "class_agreement": agreement}


def load_npz(path: Path) -> tuple[np.ndarray, int, np.ndarray | None]:
    """(images flattened to [0, 1], image size, labels or None)."""
    with np.load(path) as data:
        images = data["arr_0"]
        labels = data["arr_1"] if "arr_1" in data.files else None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 1:
        raise SystemExit(f"error: {path} is not a uint8 NHWC npz of 1-channel images (evaluate.py on a digits run)")
    return images.reshape(len(images), -1).astype(np.float64) / 255.0, images.shape[1], labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("npz", nargs="+", type=Path)
    args = parser.parse_args()
    samples = {path: load_npz(path) for path in args.npz}
    sizes = {size for _, size, _ in samples.values()}
    if len(sizes) != 1:
        raise SystemExit(f"error: the npz files hold images of different sizes {sorted(sizes)}; score one size at a time")
    train_x, train_y, val_x = digits_split(sizes.pop())
    classifier = MLPClassifier(hidden_layer_sizes=(64,), alpha=1e-3, max_iter=1000, random_state=0).fit(train_x, train_y)
    train_features = hidden_features(classifier, train_x)
    reference = (train_features.mean(0), np.cov(train_features, rowvar=False))

    rows = [("validation images (floor)", scores(classifier, val_x, reference))]
    rows += [(str(path), scores(classifier, x, reference, labels)) for path, (x, _, labels) in samples.items()]
    print("| images | n | FD (digit features) | digit IS | confidence | class agreement |")
    print("|---|---|---|---|---|---|")
    for name, s in rows:
        agreement = "" if s["class_agreement"] is None else f"{100 * s['class_agreement']:.1f}%"
        print(f"| {name} | {s['n']} | {s['fd']:.2f} | {s['digit_is']:.2f} | {s['confidence']:.3f} | {agreement} |")


if __name__ == "__main__":
    main()
