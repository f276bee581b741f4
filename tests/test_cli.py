"""The experiment CLI on a tiny random BERT and tiny data built here (fast, offline)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

from srlora import data
from srlora.cli import main
from srlora.plots import active_intervals

WORDS = [
    "good",
    "bad",
    "great",
    "awful",
    "fine",
    "poor",
    "movie",
    "film",
    "plot",
    "acting",
    "story",
    "dull",
    "fun",
    "boring",
    "superb",
    "weak",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(folder)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    BertForSequenceClassification(cfg).save_pretrained(folder)
    return folder


def _sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))


@pytest.fixture()
def fake_cache(tmp_path, monkeypatch) -> Path:
    """An SRLORA_CACHE whose 'vader' asset is a small file in the real layout."""
    cache = tmp_path / "cache"
    folder = cache / "vader"
    folder.mkdir(parents=True)
    rng = random.Random(0)
    n_pos = data.MR_POSITIVE_LINES
    lines = []
    for i in range(1, 6001):
        rating = rng.uniform(0.1, 4) if i <= n_pos else -rng.uniform(0.1, 4)
        lines.append(f"{i}\t{rating:.3f}\t{_sentence(rng)}")
    (folder / "movieReviewSnippets_GroundTruth.txt").write_text("\n".join(lines) + "\n")
    monkeypatch.setenv("SRLORA_CACHE", str(cache))
    return cache


def test_mr_split_is_fixed_and_documented(fake_cache):
    task = data.load_task("mr")
    again = data.load_task("mr")
    assert task.train.text_a == again.train.text_a
    n = 6000
    assert (len(task.train), len(task.dev), len(task.test)) == (4800, 600, 600)
    assert len(set(task.train.text_a) & set(task.dev.text_a)) <= len(task.dev)  # same texts may repeat
    # Labels follow file order: line <= 5152 is positive.
    assert sum(task.train.labels) + sum(task.dev.labels) + sum(task.test.labels) == data.MR_POSITIVE_LINES
    reg = data.load_task("mr-reg")
    assert reg.num_labels == 1 and all(-1 <= y <= 1 for y in reg.train.labels)
    assert n == len(task.train) + len(task.dev) + len(task.test)


def _glue_folder(root: Path) -> Path:
    rng = random.Random(1)
    (root / "SST-2").mkdir(parents=True)
    (root / "RTE").mkdir()
    (root / "STS-B").mkdir()
    for split, n in (("train", 64), ("dev", 24)):
        rows = ["sentence\tlabel"] + [f"{_sentence(rng)}\t{rng.randint(0, 1)}" for _ in range(n)]
        (root / "SST-2" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        rows = ["index\tsentence1\tsentence2\tlabel"] + [
            f"{i}\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.choice(['entailment', 'not_entailment'])}" for i in range(n)
        ]
        (root / "RTE" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
        rows = ["index\tgenre\tsentence1\tsentence2\tscore"] + [
            f"{i}\tmain\t{_sentence(rng)}\t{_sentence(rng)}\t{rng.uniform(0, 5):.2f}" for i in range(n)
        ]
        (root / "STS-B" / f"{split}.tsv").write_text("\n".join(rows) + "\n")
    return root


def test_glue_pairs_are_read(tmp_path):
    root = _glue_folder(tmp_path / "GLUE")
    rte = data.load_task("rte", root)
    assert rte.train.text_b is not None and len(rte.train.text_b) == 64
    assert set(rte.train.labels) <= {0, 1}
    stsb = data.load_task("stsb", root)
    assert stsb.num_labels == 1 and stsb.metrics == ["pearson", "spearman"]
    with pytest.raises(FileNotFoundError, match="official layout"):
        data.load_task("mrpc", root)


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_compare_writes_table_and_plots(tiny_model, fake_cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--model",
            str(tiny_model),
            "--max-steps",
            "40",
            "--eval-every",
            "20",
            "--max-eval",
            "64",
            "--r",
            "4",
            "--alpha",
            "4",
            "--r-target",
            "12",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--seeds",
            "1,2",
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["summary"]) == {"lora", "pissa", "srlora"}
    # Equal trainable parameters for the three methods.
    assert len({res["summary"][m]["trainable_params"] for m in res["summary"]}) == 1
    for r in res["runs"]:
        assert r["steps"] == 40 and r["final"]["step"] == 40
        assert 0.0 <= r["final"]["accuracy"] <= 1.0
    for name in ("loss_curves.png", "active_intervals.png", "interval_variance.png", "results.md"):
        assert (out / name).stat().st_size > 1000 or name == "results.md"
    assert "| srlora |" in (out / "results.md").read_text()
    # Same data order for every method: the first batch's loss differs only by init.
    first = {m: json.loads((out / m / "seed1" / "metrics.jsonl").read_text().splitlines()[0]) for m in res["methods"]}
    assert all(v["step"] == 1 for v in first.values())
    hist = json.loads((out / "srlora" / "seed1" / "history.json").read_text())
    # N_switch = (12 - 4) / 2 = 4, t = 10: switches after steps 10, 20, 30 (not 40, the last).
    assert sorted({e["step"] for e in hist["events"]}) == [10, 20, 30]
    layer = next(iter(hist["slot_directions"]))
    spans = active_intervals(hist, layer)
    assert set(spans) == set(range(4 + 3 * 2))
    assert all(0 <= a < b <= 40 for v in spans.values() for a, b in v)
    assert "srlora" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_train_on_glue_pairs_regression(tiny_model, tmp_path):
    root = _glue_folder(tmp_path / "GLUE")
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--task",
            "stsb",
            "--data-dir",
            str(root),
            "--model",
            str(tiny_model),
            "--method",
            "srlora",
            "--max-steps",
            "40",
            "--eval-every",
            "40",
            "--r",
            "4",
            "--r-target",
            "12",
            "--batch-size",
            "8",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["final"]) == {"step", "eval_loss", "pearson", "spearman"}
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "loss" in x] == list(range(1, 41))


def test_bad_options_are_clear(tiny_model, tmp_path, capsys):
    assert main(["train", "--task", "nope", "--model", str(tiny_model)]) == 2
    assert "Unknown task 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compare", "--methods", "lora,adalora", "--model", str(tiny_model)])


@pytest.fixture(scope="module")
def tiny_vit(tmp_path_factory) -> Path:
    from transformers import Dinov2Config, Dinov2Model

    folder = tmp_path_factory.mktemp("tiny-dinov2")
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=4, image_size=16
    )
    Dinov2Model(cfg).save_pretrained(folder)
    return folder


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_image_task_on_tiny_vit(tiny_vit, tmp_path):
    """digits (scikit-learn, offline) through the image path: resize, 3 channels, ViT head."""
    out = tmp_path / "cmp"
    rc = main(
        [
            "compare",
            "--task",
            "digits",
            "--model",
            str(tiny_vit),
            "--image-size",
            "16",
            "--max-steps",
            "40",
            "--eval-every",
            "40",
            "--r",
            "4",
            "--alpha",
            "4",
            "--r-target",
            "12",
            "--batch-size",
            "16",
            "--lr",
            "3e-3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for r in res["runs"]:
        assert r["final"]["step"] == 40 and set(r["final"]) == {"step", "eval_loss", "accuracy"}
    # The head is trained in full with every method (modules_to_save), LoRA on the rest.
    assert len({r["trainable_params"] for r in res["runs"]}) == 1
    hist = json.loads((out / "srlora" / "seed1" / "history.json").read_text())
    assert any("attention" in name for name in hist["slot_directions"])
    assert (out / "active_intervals.png").stat().st_size > 1000


def test_digits_split():
    task = data.load_task("digits")
    assert (len(task.train), len(task.dev), len(task.test)) == (1438, 180, 179)
    assert task.train.images.shape[1:] == (8, 8) and float(task.train.images.max()) == 1.0
    # Ten classes, each 8-12% of the dev split.
    counts = [task.dev.labels.count(k) for k in range(10)]
    assert min(counts) >= 0.05 * len(task.dev) and max(counts) <= 0.15 * len(task.dev)


def test_train_with_adaptive_switch(tiny_model, tmp_path):
    root = _glue_folder(tmp_path / "GLUE")
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--task",
            "sst2",
            "--data-dir",
            str(root),
            "--model",
            str(tiny_model),
            "--method",
            "srlora",
            "--max-steps",
            "60",
            "--eval-every",
            "60",
            "--r",
            "4",
            "--r-target",
            "8",
            "--batch-size",
            "8",
            "--adaptive-switch",
            "--adaptive-patience",
            "3",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    assert json.loads((out / "config.json").read_text())["adaptive_switch"] is True
    hist = json.loads((out / "history.json").read_text())
    # r=4, r'=2, r_target=8: at most 2 switches per layer, the first not before step 19.
    per_layer = {}
    for e in hist["events"]:
        per_layer.setdefault(e["layer"], []).append(e["step"])
    assert per_layer and all(1 <= len(v) <= 2 and v[0] >= 19 for v in per_layer.values())


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_compare_resume_keeps_finished_runs(tiny_model, fake_cache, tmp_path, capsys):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        str(tiny_model),
        "--max-steps",
        "20",
        "--eval-every",
        "20",
        "--max-eval",
        "32",
        "--r",
        "4",
        "--r-target",
        "8",
        "--batch-size",
        "8",
        "--methods",
        "lora,srlora",
        "--out",
        str(out),
    ]
    assert main(args) == 0
    first = (out / "lora" / "seed1" / "results.json").read_text()
    (out / "srlora" / "seed1" / "results.json").unlink()  # as if killed before it finished
    capsys.readouterr()
    assert main([*args, "--resume"]) == 0
    err = capsys.readouterr().err
    assert "lora/seed1: finished earlier, kept" in err and "srlora/seed1: finished earlier" not in err
    assert (out / "lora" / "seed1" / "results.json").read_text() == first
    assert (out / "srlora" / "seed1" / "results.json").is_file()
    # A changed configuration is not "the same run": everything runs again.
    assert main([*args, "--resume", "--lr", "1e-3"]) == 0
    assert "finished earlier" not in capsys.readouterr().err


def test_compare_checks_srlora_settings_before_any_run(tiny_model, tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--model", str(tiny_model), "--r", "8", "--r-target", "10", "--out", str(out)]) == 2
    assert "r_target >= 12" in capsys.readouterr().err
    assert not (out / "lora").exists()
