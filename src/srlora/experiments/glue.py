"""GLUE tasks from a local folder in the official TSV layout (``--data-dir``), or from the
``datasets`` library where its hub can be reached.

Every TSV is checked as it is read: a missing column, an empty file, a short row, a label
that is not a number or not one of the task's classes stops the run with ``file:line``
before any model is built.
"""

from __future__ import annotations

import csv
from pathlib import Path

from .splits import Split, Task

GLUE_TASKS = ("sst2", "mrpc", "cola", "qnli", "rte", "stsb")

# name -> (folder, columns of text_a / text_b / label (names, or indices: no header), labels, metrics)
_GLUE = {
    "sst2": ("SST-2", "sentence", None, "label", 2, ["accuracy"]),
    "mrpc": ("MRPC", "#1 String", "#2 String", "Quality", 2, ["accuracy", "f1"]),
    "cola": ("CoLA", 3, None, 1, 2, ["matthews"]),
    "qnli": ("QNLI", "question", "sentence", "label", 2, ["accuracy"]),
    "rte": ("RTE", "sentence1", "sentence2", "label", 2, ["accuracy"]),
    "stsb": ("STS-B", "sentence1", "sentence2", "score", 1, ["pearson", "spearman"]),
}
_GLUE_LABELS = {"entailment": 0, "not_entailment": 1}


def read_glue_tsv(path: Path, a: str | int, b: str | int | None, y: str | int, num_labels: int) -> Split:
    """One GLUE TSV: column ``a`` (and ``b``) the texts, ``y`` the label (names in the header
    row, or indices for a file without one, as CoLA's).

    Raises:
        ValueError: ``file:line`` and what is wrong, for a missing column, an empty file, a
            row with too few columns, or a label that is not a number / not one of the
            ``num_labels`` classes.
    """
    regression = num_labels == 1
    with open(path, encoding="utf-8", newline="") as fh:
        rows = list(csv.reader(fh, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows:
        raise ValueError(f"{path}: the file is empty; expected the GLUE TSV layout (a header row, then examples).")
    first = 1
    if isinstance(a, int):
        index = {"a": a, "y": y, "b": b}
    else:
        header, first = rows[0], 2
        missing = [c for c in (a, b, y) if c is not None and c not in header]
        if missing:
            raise ValueError(f"{path}:1: no column {missing[0]!r} in the header {header}; is this the right GLUE file?")
        index = {"a": header.index(a), "y": header.index(y), "b": None if b is None else header.index(b)}
    need = max(i for i in index.values() if i is not None) + 1
    text_a, text_b, labels = [], [], []
    for lineno, row in enumerate(rows[first - 1 :], start=first):
        if not row:  # a blank line carries no example
            continue
        if len(row) < need:
            raise ValueError(f"{path}:{lineno}: {len(row)} column(s), expected at least {need} (a truncated row?).")
        labels.append(_label(row[index["y"]], regression, num_labels, f"{path}:{lineno}"))  # type: ignore[index]
        text_a.append(row[index["a"]])  # type: ignore[index]
        if index["b"] is not None:
            text_b.append(row[index["b"]])
    if not labels:
        raise ValueError(f"{path}: no examples after the header.")
    return Split(text_a, labels, text_b if b is not None else None)


def _label(raw: str, regression: bool, num_labels: int, where: str) -> float | int:
    raw = raw.strip()
    if regression:
        try:
            return float(raw)
        except ValueError:
            raise ValueError(f"{where}: label {raw!r} is not a number (a regression target).") from None
    if raw in _GLUE_LABELS:
        return _GLUE_LABELS[raw]
    try:
        label = int(raw)
    except ValueError:
        label = -1
    if not 0 <= label < num_labels:
        raise ValueError(f"{where}: label {raw!r} is not one of the task's classes 0..{num_labels - 1}.")
    return label


def load_glue(name: str, data_dir: Path | None) -> Task:
    folder, a, b, y, num_labels, metrics = _GLUE[name]
    if data_dir is not None:
        root = Path(data_dir)
        base = root / folder if (root / folder).is_dir() else root
        if not (base / "train.tsv").is_file() or not (base / "dev.tsv").is_file():
            raise FileNotFoundError(
                f"No {folder}/train.tsv and dev.tsv under {root}. Give --data-dir the GLUE folder in the "
                f"official layout (GLUE/{folder}/train.tsv, dev.tsv)."
            )
        train = read_glue_tsv(base / "train.tsv", a, b, y, num_labels)
        dev = read_glue_tsv(base / "dev.tsv", a, b, y, num_labels)
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
