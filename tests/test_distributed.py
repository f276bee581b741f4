"""torchrun with 2 CPU processes (gloo): DDP, FSDP2 and DeepSpeed ZeRO-1/2/3 make the switches
one process makes on the same global batches. Each worker runs all of its checks in one launch
(tests/launch.py); the one-process references run here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import check, entry, in_process, torchrun

pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent


def test_ddp_two_processes_identical(tmp_path):
    check(torchrun(HERE / "ddp_worker.py", str(tmp_path)))
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["controller"]["history"] == r1["controller"]["history"]
    assert sorted({e["step"] for e in r0["controller"]["history"]}) == [20, 40, 60, 80, 100]
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    for name, layer in r0["controller"]["layers"].items():
        for k, v in layer["importance"].items():
            assert torch.equal(v, r1["controller"]["layers"][name]["importance"][k]), (name, k)


def _structure(history: list[dict]) -> list[dict]:
    return [{k: e[k] for k in ("step", "layer", "slots", "directions", "evicted")} for e in history]


@pytest.fixture(scope="module")
def fsdp_runs(tmp_path_factory) -> Path:
    """FSDP2 on 2 ranks with each policy, and SRLoRA switched before the shard: one launch."""
    out = tmp_path_factory.mktemp("fsdp")
    check(torchrun(HERE / "fsdp_worker.py", str(out)))
    return out


@pytest.mark.parametrize("policy", ["spectrum", "gradient"])
def test_fsdp2_two_ranks_match_one_process_on_the_full_batches(fsdp_runs, policy):
    """FSDP2 (fully_shard per block and root), each rank on half of every global batch: the same
    effective weights W + s B A as one process on the full batches, the same switches."""
    import fsdp_worker

    r0, r1 = (entry(fsdp_runs / f"fsdp-rank{k}.pt", policy) for k in (0, 1))
    one = in_process(fsdp_worker.run, policy)
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


def test_srlora_that_switched_before_fully_shard_is_refused_with_the_order(fsdp_runs):
    """Built before sharding and attached before any step, SRLoRA follows the split (the
    wraps test, "built-before"); once it has switched on whole layers it cannot."""
    for rank in (0, 1):
        error = entry(fsdp_runs / f"fsdp-rank{rank}.pt", "srlora-first")["refused"]
        assert error is not None and "Build it after sharding: get_peft_model -> fully_shard" in error


@pytest.fixture(scope="module")
def zero_runs(tmp_path_factory) -> Path:
    """ZeRO-3 with SRLoRA built before or after deepspeed.initialize, ZeRO-2 and ZeRO-1: one launch."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("zero")
    check(torchrun(HERE / "zero3_worker.py", str(out)))
    return out


@pytest.mark.parametrize("order,stage", [("before", 3), ("after", 3), ("after", 2), ("after", 1)])
def test_deepspeed_zero3_two_ranks_match_one_process(zero_runs, order, stage):
    """ZeRO-3 (partitioned parameters, DeepSpeed's AdamW), SRLoRA built before deepspeed.initialize
    and driven by hand around the engine, or after it and attached to the engine's optimizer,
    each rank on half of every global batch: the same switches and effective weights as one
    process on the full batches."""
    import zero3_worker

    r0, r1 = (entry(zero_runs / f"zero-rank{k}.pt", f"{order}-{stage}") for k in (0, 1))
    one = in_process(zero3_worker.reference)
    assert r0["history"] == r1["history"] and _structure(r0["history"]) == _structure(one["history"])
    assert len(one["history"]) == 2 * 12
    for name, w in one["weights"].items():
        assert float((r0["weights"][name] - w).norm() / w.norm()) < 1e-5, name
    assert r0["attached"] == (order == "after")  # attached around the ZeRO optimizer's step, or by hand
    if stage == 3:  # the scores' whole masters and gradients: one all-gather a step, DeepSpeed's values
        for gathers in (r0["gathers"], r1["gathers"]):
            assert gathers["equal"] and gathers["at_once"] == 1, gathers
            assert gathers["one_by_one"] == 4 * gathers["layers"] == 4 * 12, gathers
