"""The task loaders: fixed, documented splits, GLUE TSVs and the image sets (offline)."""

from __future__ import annotations

import pytest
from conftest import glue_folder

from srlora.experiments import tasks as data


def test_mr_split_is_fixed_and_documented(fake_cache):
    task = data.load_task("mr")
    again = data.load_task("mr")
    assert task.train.text_a == again.train.text_a
    n = 6000
    assert (len(task.train), len(task.dev), len(task.test)) == (4800, 600, 600)
    # Every line lands in exactly one split.
    train, dev, test = set(task.train.text_a), set(task.dev.text_a), set(task.test.text_a)
    assert not (train & dev) and not (train & test) and not (dev & test)
    assert len(train | dev | test) == n
    # Labels follow file order: line <= 5152 is positive.
    assert sum(task.train.labels) + sum(task.dev.labels) + sum(task.test.labels) == data.MR_POSITIVE_LINES
    reg = data.load_task("mr-reg")
    assert reg.num_labels == 1 and all(-1 <= y <= 1 for y in reg.train.labels)
    assert n == len(task.train) + len(task.dev) + len(task.test)


def test_glue_pairs_are_read(tmp_path):
    root = glue_folder(tmp_path / "GLUE")
    rte = data.load_task("rte", root)
    assert rte.train.text_b is not None and len(rte.train.text_b) == 64
    assert set(rte.train.labels) <= {0, 1}
    stsb = data.load_task("stsb", root)
    assert stsb.num_labels == 1 and stsb.metrics == ["pearson", "spearman"]
    with pytest.raises(FileNotFoundError, match="official layout"):
        data.load_task("mrpc", root)


def test_digits_split():
    task = data.load_task("digits")
    assert (len(task.train), len(task.dev), len(task.test)) == (1438, 180, 179)
    assert task.train.images.shape[1:] == (8, 8) and float(task.train.images.max()) == 1.0
    # Ten classes, each 8-12% of the dev split.
    counts = [task.dev.labels.count(k) for k in range(10)]
    assert min(counts) >= 0.05 * len(task.dev) and max(counts) <= 0.15 * len(task.dev)
