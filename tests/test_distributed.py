"""torchrun with 2 CPU processes (gloo): every rank makes identical switches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


def test_ddp_two_processes_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["controller"]["history"] == r1["controller"]["history"]
    assert sorted({e["step"] for e in r0["controller"]["history"]}) == [20, 40, 60, 80, 100]
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    for name, layer in r0["controller"]["layers"].items():
        for k, v in layer["importance"].items():
            assert torch.equal(v, r1["controller"]["layers"][name]["importance"][k]), (name, k)


FSDP_WORKER = Path(__file__).parent / "fsdp_worker.py"


def _torchrun(worker: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, timeout=600
    )


def _structure(history: list[dict]) -> list[dict]:
    return [{k: e[k] for k in ("step", "layer", "slots", "directions", "evicted")} for e in history]


@pytest.mark.parametrize("policy", ["spectrum", "gradient"])
def test_fsdp2_two_ranks_match_one_process_on_the_full_batches(tmp_path, policy):
    """FSDP2 (fully_shard per block and root), each rank on half of every global batch: the same
    effective weights W + s B A as one process on the full batches, the same switches."""
    proc = _torchrun(FSDP_WORKER, str(tmp_path), "--policy", policy)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = subprocess.run(
        [sys.executable, str(FSDP_WORKER), str(tmp_path), "--reference", "--policy", policy],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    r0, r1, one = (torch.load(tmp_path / f, weights_only=False) for f in ("rank0.pt", "rank1.pt", "reference.pt"))
    assert r0["history"] == r1["history"], "both ranks make the same switches"
    # The same switches as one process; the recorded scores agree to float32 reduction noise.
    assert _structure(r0["history"]) == _structure(one["history"]) and len(one["history"]) == 2 * 12
    for e0, e1 in zip(r0["history"], one["history"], strict=True):
        torch.testing.assert_close(torch.tensor(e0["scores"]), torch.tensor(e1["scores"]), rtol=1e-4, atol=0)
    for name, w in one["weights"].items():
        for rank in (r0, r1):
            assert float((rank["weights"][name] - w).norm() / w.norm()) < 1e-5, name
    # Each rank keeps the left singular vectors of its own half of the rows (all of them under
    # the gradient policy, which projects the whole output gradient).
    for name, m in one["svd_rows"].items():
        assert r0["svd_rows"][name] == r1["svd_rows"][name] == (m if policy == "gradient" else m // 2)
    # SRLoRA's state, saved per rank, loads into a controller built the same way.
    for rank in (r0, r1):
        for name, scores in rank["scores"].items():
            torch.testing.assert_close(rank["restored_scores"][name], scores, rtol=0, atol=0)


def test_srlora_that_switched_before_fully_shard_is_refused_with_the_order(tmp_path):
    """Built before sharding and attached before any step, SRLoRA follows the split (the
    wraps test, "built-before"); once it has switched on whole layers it cannot."""
    proc = _torchrun(FSDP_WORKER, str(tmp_path), env={"SRLORA_TEST_ORDER": "srlora-first"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        error = torch.load(tmp_path / f"order-rank{rank}.pt", weights_only=False)["error"]
        assert "Build it after sharding: get_peft_model -> fully_shard" in error


ZERO3_WORKER = Path(__file__).parent / "zero3_worker.py"


@pytest.mark.parametrize("order,stage", [("before", 3), ("after", 3), ("after", 2), ("after", 1)])
def test_deepspeed_zero3_two_ranks_match_one_process(tmp_path, order, stage):
    """ZeRO-3 (partitioned parameters, DeepSpeed's AdamW), SRLoRA built before deepspeed.initialize
    and driven by hand around the engine, or after it and attached to the engine's optimizer,
    each rank on half of every global batch: the same switches and effective weights as one
    process on the full batches."""
    pytest.importorskip("deepspeed")
    env = {"DS_ACCELERATOR": "cpu"}
    proc = _torchrun(ZERO3_WORKER, str(tmp_path), "--order", order, "--stage", str(stage), env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = subprocess.run(
        [sys.executable, str(ZERO3_WORKER), str(tmp_path), "--reference"],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"{order}-stage{stage}-rank{k}.pt", weights_only=False) for k in (0, 1))
    one = torch.load(tmp_path / "reference.pt", weights_only=False)
    assert r0["history"] == r1["history"] and _structure(r0["history"]) == _structure(one["history"])
    assert len(one["history"]) == 2 * 12
    for name, w in one["weights"].items():
        assert float((r0["weights"][name] - w).norm() / w.norm()) < 1e-5, name
    assert r0["attached"] == (order == "after")  # attached around the ZeRO optimizer's step, or by hand
