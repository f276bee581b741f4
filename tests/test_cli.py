"""The experiment CLI on a tiny random BERT and tiny data built here (fast, offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import glue_folder

from srlora.experiments.cli import main
from srlora.experiments.plots import active_intervals


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
    # Same data order and dropout masks for every method (the tiny BERT has dropout 0.1), and
    # the three inits leave the output unchanged: the first step's loss is the same for all.
    first = {m: json.loads((out / m / "seed1" / "metrics.jsonl").read_text().splitlines()[0]) for m in res["methods"]}
    assert all(v["step"] == 1 for v in first.values())
    assert max(v["loss"] for v in first.values()) - min(v["loss"] for v in first.values()) < 1e-5
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
    root = glue_folder(tmp_path / "GLUE")
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
    # srlora train has no general text for subspace_whiten's covariance: the error says where it is
    argv = ["train", "--model", str(tiny_model), "--direction-policy", "gradient_subspace", "--subspace-whiten", "8"]
    assert main(argv) == 2
    assert "srlora absorb" in capsys.readouterr().err


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


def test_train_with_adaptive_switch(tiny_model, tmp_path):
    root = glue_folder(tmp_path / "GLUE")
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
    assert json.loads((out / "config.json").read_text())["srlora"]["adaptive_switch"] is True
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


def test_the_main_jobs_console_shows_no_third_party_warning(tiny_model, tmp_path):
    """`srlora compare` run as a user runs it (a fresh process, Python's default warning filters):
    its console holds srlora's progress and table, and no warning from another package (PEFT's
    read of transformers' deprecated `is_gradient_checkpointing` printed a FutureWarning per
    method; bitsandbytes, imported by PEFT, logs one about an optional CPU kernel)."""
    import os
    import subprocess
    import sys

    glue = glue_folder(tmp_path / "glue")
    args = ["compare", "--task", "sst2", "--data-dir", str(glue), "--model", str(tiny_model), "--max-steps", "40"]
    args += ["--eval-every", "20", "--r", "4", "--alpha", "4", "--r-target", "8", "--batch-size", "8"]
    args += ["--seeds", "1", "--out", str(tmp_path / "cmp")]
    code = "import sys; from srlora.experiments import main; sys.exit(main(sys.argv[1:]))"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"} | {"OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| srlora |" in done.stdout
    # Python's default filters, as a user's console has them; logged warnings too (bitsandbytes').
    warned = [line for line in done.stderr.splitlines() if "Warning" in line or "WARNING" in line]
    warned += [line for line in done.stderr.splitlines() if "Failed to load" in line]
    assert warned == [], warned
