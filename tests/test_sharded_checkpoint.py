"""Checkpoints of sharded runs (torchrun, 2 CPU processes, gloo): every rank saves its
shards and a rebuilt run resumes bit-exactly under FSDP2 and ZeRO-1/2/3, a save killed midway
leaves the previous checkpoint whole, a rank that skips a collective call is a clear error, and
one rank's state given to another is refused. Apart from tests/test_sharded.py so that the two
launches run side by side under pytest-xdist."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import check, entry, torchrun
from sharded_ckpt_worker import SAVE

HERE = Path(__file__).parent
pytestmark = pytest.mark.distributed

# (how the model is split, what enters at a switch; sharded_worker.CONFIGS): trained to step 15,
# saved, trained on to 25, and rebuilt from the checkpoint.
CHECKPOINTED = [
    ("fsdp", "paper"),
    ("zero1", "paper"),
    ("zero3", "paper"),
    ("fsdp", "subspace"),
    ("zero2", "subspace"),
    ("zero3", "subspace"),
    ("fsdp", "left-alone"),
    ("zero2", "left-alone"),
    ("zero3", "lora-start"),
    ("fsdp", "no-records"),
    ("fsdp", "whitened"),
    ("zero2", "whitened"),
]


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory) -> Path:
    """Every split and entry of CHECKPOINTED trained, saved, trained on and resumed, and rank 0's
    SRLoRA state offered to rank 1: all on the same 2 ranks, in one launch."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("checkpointed")
    runs = [f"{m}:{e}" for m, e in CHECKPOINTED]
    check(torchrun(HERE / "sharded_ckpt_worker.py", str(out), "--runs", *runs, "wrong-rank"))
    return out


@pytest.mark.parametrize("mode,entry", CHECKPOINTED)
def test_a_sharded_checkpoint_resumes_bit_exactly(checkpointed, mode, entry):
    """Every rank saves its shards (a folder, swapped in once complete; under ZeRO the engine's own
    checkpoint inside it); a run rebuilt from it ends where the uninterrupted run ends, bit for
    bit, with the same switches."""
    folder = checkpointed / f"ckpt-{mode}-{entry}"
    for rank in (0, 1):
        result = _entry_of(checkpointed, rank, f"{mode}:{entry}")
        straight, resumed = result["straight"], result["resumed"]
        assert resumed["step"] == SAVE and resumed["history"] == straight["history"] and straight["history"]
        assert straight["state"].keys() == resumed["state"].keys()
        for key, value in straight["state"].items():
            assert torch.equal(value, resumed["state"][key]), key
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == ["manifest.json", "rank00000.pt", "rank00001.pt"]
    assert (folder / "deepspeed").is_dir() == mode.startswith("zero")


def _entry_of(out: Path, rank: int, name: str) -> dict:
    return entry(out / f"ckpt-rank{rank}.pt", name)


def test_a_save_killed_midway_leaves_the_previous_checkpoint_whole(tmp_path):
    """SIGKILL on one rank after the rank files are written, before the swap: the previous
    checkpoint is untouched and loads bit-exactly; the next save removes the leftovers."""
    killed = torchrun(HERE / "sharded_ckpt_worker.py", str(tmp_path), "--runs", "fsdp:paper", "--kill")
    assert killed.returncode != 0
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-fsdp")]
    assert len(leftovers) == 1 and not (leftovers[0] / "manifest.json").exists()
    assert (tmp_path / "ckpt-fsdp-paper" / "manifest.json").is_file()
    check(torchrun(HERE / "sharded_ckpt_worker.py", str(tmp_path), "--runs", "fsdp:paper"))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".ckpt-fsdp")]
    for rank in (0, 1):
        result = _entry_of(tmp_path, rank, "fsdp:paper")
        survivor = result["survivor"]  # the checkpoint the killed save left, loaded first
        assert survivor["step"] == SAVE
        for key, value in result["at_save"].items():
            assert torch.equal(survivor["state"][key], value), key


def test_a_rank_that_skips_a_collective_call_is_a_clear_error_not_a_hang(tmp_path):
    proc = torchrun(HERE / "missing_rank_worker.py", str(tmp_path), env={"SRLORA_COLLECTIVE_TIMEOUT": "5"})
    message = (tmp_path / "rank0-error.txt").read_text()
    assert "export_lora is a collective call" in message and "every rank must call it" in message, proc.stderr[-2000:]


def test_a_sharded_state_given_to_another_rank_is_refused(checkpointed):
    """Each FSDP2 rank holds its own rows of SRLoRA's fused records: rank 0's state loaded on
    rank 1 (one process's state saved for all) is a CheckpointError naming the way out."""
    assert _entry_of(checkpointed, 0, "wrong-rank")["message"] == "loaded"
    message = _entry_of(checkpointed, 1, "wrong-rank")["message"]
    assert "saved by rank 0 of 2; this is rank 1 of 2" in message and "srlora.save_checkpoint" in message
