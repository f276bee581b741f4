"""SRLoRA under FSDP2 whatever fully_shard wraps, and the trained result out of sharded runs
(torchrun, 2 CPU processes, gloo), each against one process on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def _torchrun(worker: Path, *args: str, env: dict | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _python(worker: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, str(worker), *args], capture_output=True, text=True, env=env, timeout=600)


def _structure(history: list[dict]) -> list[tuple]:
    return [(e["step"], e["layer"], e["slots"], e["directions"], e["evicted"]) for e in history]


def test_fsdp2_whatever_fully_shard_wraps(tmp_path):
    """The root only, blocks, each PEFT LoRA layer, each base layer, each lora_A / lora_B leaf,
    a mix, bfloat16 compute with float32 masters, and SRLoRA built before fully_shard: every
    wrap makes the switches one process makes, and (float32) ends at its weights within 1e-5."""
    worker = HERE / "fsdp_wraps_worker.py"
    proc = _torchrun(worker, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = _python(worker, str(tmp_path), "--reference")
    assert ref.returncode == 0, ref.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"wraps-rank{k}.pt", weights_only=False) for k in (0, 1))
    one = torch.load(tmp_path / "wraps-reference.pt", weights_only=False)
    assert set(r0) == {"root", "blocks", "lora-layer", "base-layer", "leaf", "mix", "blocks-bf16", "built-before"}
    for how, run in r0.items():
        assert "error" not in run, (how, run.get("error"))
        assert run["kinds"] == ["fsdp2"] and run["masters"] == ["torch.float32"], how
        assert _structure(run["history"]) == _structure(r1[how]["history"]), how
        assert _structure(run["history"]) == _structure(one["history"]) and len(one["history"]) == 3 * 12, how
        assert run["switch_moved"] < 1e-5, how  # a switch leaves the function unchanged
        errors = [float((run["weights"][n] - w).norm() / w.norm()) for n, w in one["weights"].items()]
        # bfloat16 compute takes another trajectory than float32 over 45 steps at lr 1e-2
        # (~15% here); the float32 wraps agree with one process to float rounding.
        assert max(errors) < (0.3 if how == "blocks-bf16" else 1e-5), (how, max(errors))


# (how the model is split, what enters at a switch): FSDP2 and ZeRO-1/2/3 with the paper's
# entries; FSDP2, ZeRO-2 and ZeRO-3 with issue 24's (the gradient subspace at half the first
# pairs' scale: sketches summed over ranks, records of the entered pairs).
EXPORTED = [("fsdp", "paper"), ("zero2", "paper"), ("zero3", "paper"), ("fsdp", "subspace"), ("zero3", "subspace")]
CHECKPOINTED = [
    ("fsdp", "paper"),
    ("zero1", "paper"),
    ("zero3", "paper"),
    ("fsdp", "subspace"),
    ("zero2", "subspace"),
    ("zero3", "subspace"),
]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> Path:
    """One trained run per split and entry (on 2 ranks; and one process per entry), each exported
    and merged."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("sharded")
    worker = HERE / "sharded_worker.py"
    for mode, entry in EXPORTED:
        proc = _torchrun(worker, str(out), "--mode", mode, "--entry", entry, env={"DS_ACCELERATOR": "cpu"})
        assert proc.returncode == 0, (mode, entry, proc.stderr[-3000:])
    for entry in sorted({entry for _, entry in EXPORTED}):
        ref = _python(worker, str(out), "--mode", "reference", "--entry", entry)
        assert ref.returncode == 0, ref.stderr[-3000:]
    return out


@pytest.mark.parametrize("mode,entry", EXPORTED)
def test_export_of_a_sharded_run_loads_in_plain_peft_and_equals_one_process(sharded_results, mode, entry):
    import peft
    from conftest import CASES, make_base
    from safetensors.torch import load_file
    from sharded_worker import batch

    out = sharded_results
    ref = torch.load(out / f"reference-{entry}-rank0.pt", weights_only=False)
    ranks = [torch.load(out / f"{mode}-{entry}-rank{k}.pt", weights_only=False) for k in (0, 1)]
    assert ranks[1]["errors"] == {} and max(ranks[0]["errors"].values()) < 1e-6  # rank 0 wrote it, exactly
    # The adapter's update, layer by layer, equals the one-process export's (the factors of a
    # truncated SVD are not unique; their products are).
    mine, theirs = (load_file(out / f"adapter-{m}-{entry}" / "adapter_model.safetensors") for m in (mode, "reference"))
    for key in (k for k in theirs if k.endswith("lora_A.weight")):
        b_key = key.replace("lora_A", "lora_B")
        prod, want = mine[b_key] @ mine[key], theirs[b_key] @ theirs[key]
        assert float((prod - want).norm() / want.norm()) < 1e-5, key
    # Loaded by plain PEFT on one process, on the untouched base: the trained model's function.
    loaded = peft.PeftModel.from_pretrained(make_base(CASES["bert"]), out / f"adapter-{mode}-{entry}").eval()
    with torch.no_grad():
        logits = loaded(**batch(999)).logits
    torch.testing.assert_close(logits, ref["trained"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat([r["trained"] for r in ranks]), ref["trained"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,entry", EXPORTED)
def test_merge_of_a_sharded_run_equals_one_process(sharded_results, mode, entry):
    out = sharded_results
    ref = torch.load(out / f"reference-{entry}-rank0.pt", weights_only=False)
    ranks = [torch.load(out / f"{mode}-{entry}-rank{k}.pt", weights_only=False) for k in (0, 1)]
    # The merged model computes what the trained one did (each rank on its half of the batch) ...
    torch.testing.assert_close(
        torch.cat([r["merged_logits"] for r in ranks]), torch.cat([r["trained"] for r in ranks]), rtol=1e-5, atol=1e-5
    )
    # ... and holds, gathered whole, the weights one process merges, with no LoRA module left.
    assert set(ranks[0]["merged"]) == set(ref["merged"]) and not any("lora_" in k for k in ref["merged"])
    for key, value in ref["merged"].items():
        torch.testing.assert_close(ranks[0]["merged"][key], value, rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("mode,entry", CHECKPOINTED)
def test_a_sharded_checkpoint_resumes_bit_exactly(tmp_path, mode, entry):
    """Every rank saves its shards (a folder, swapped in once complete; under ZeRO the engine's own
    checkpoint inside it); a run rebuilt from it ends where the uninterrupted run ends, bit for
    bit, with the same switches."""
    if mode.startswith("zero"):
        pytest.importorskip("deepspeed")
    args = ("--mode", mode, "--entry", entry)
    proc = _torchrun(HERE / "sharded_ckpt_worker.py", str(tmp_path), *args, env={"DS_ACCELERATOR": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / f"ckpt-{mode}-{entry}"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["manifest.json", "rank00000.pt", "rank00001.pt"]
    assert (folder / "deepspeed").is_dir() == mode.startswith("zero")
    for rank in (0, 1):
        result = torch.load(tmp_path / f"ckpt-{mode}-{entry}-rank{rank}.pt", weights_only=False)
        straight, resumed = result["straight"], result["resumed"]
        assert resumed["step"] == 30 and resumed["history"] == straight["history"] and straight["history"]
        assert straight["state"].keys() == resumed["state"].keys()
        for key, value in straight["state"].items():
            assert torch.equal(value, resumed["state"][key]), key


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    """SIGKILL on one rank after the rank files are written, before the swap: the previous
    checkpoint is untouched and loads bit-exactly; the next save removes the leftovers."""
    killed = _torchrun(HERE / "sharded_ckpt_worker.py", str(tmp_path), "--mode", "fsdp", "--kill")
    assert killed.returncode != 0
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-fsdp")]
    assert len(leftovers) == 1 and not (leftovers[0] / "manifest.json").exists()
    assert (tmp_path / "ckpt-fsdp-paper" / "manifest.json").is_file()
    again = _torchrun(HERE / "sharded_ckpt_worker.py", str(tmp_path), "--mode", "fsdp")
    assert again.returncode == 0, again.stderr[-3000:]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-fsdp")]
    for rank in (0, 1):
        result = torch.load(tmp_path / f"ckpt-fsdp-paper-rank{rank}.pt", weights_only=False)
        survivor = result["survivor"]  # the checkpoint the killed save left, loaded first
        assert survivor["step"] == 30
        for key, value in result["at30"].items():
            assert torch.equal(survivor["state"][key], value), key


def test_a_rank_that_skips_a_collective_call_is_a_clear_error_not_a_hang(tmp_path):
    proc = _torchrun(HERE / "missing_rank_worker.py", str(tmp_path), env={"SRLORA_COLLECTIVE_TIMEOUT": "5"})
    message = (tmp_path / "rank0-error.txt").read_text()
    assert "export_lora is a collective call" in message and "every rank must call it" in message, proc.stderr[-2000:]


def test_a_sharded_state_given_to_another_rank_is_refused(tmp_path):
    """Each FSDP2 rank holds its own rows of SRLoRA's fused records: rank 0's state loaded on
    rank 1 (one process's state saved for all) is a CheckpointError naming the way out."""
    proc = _torchrun(HERE / "wrong_rank_state_worker.py", str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "rank0.txt").read_text() == "loaded"
    message = (tmp_path / "rank1.txt").read_text()
    assert "saved by rank 0 of 2; this is rank 1 of 2" in message and "srlora.save_checkpoint" in message
