"""The Hugging Face Trainer, TRL's SFTTrainer and an Accelerate loop under DeepSpeed ZeRO (stages
3 and 2) and DDP on 2 CPU processes (torchrun, DS_ACCELERATOR=cpu), SRLoRA from its callback (or,
in the Accelerate loop, attached to the optimizer): the same switches and weights as one process
on the same global batches, and an exact resume after a kill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import check, in_process, torchrun
from test_distributed import _structure

pytest.importorskip("deepspeed")
pytestmark = pytest.mark.distributed
HERE = Path(__file__).parent
WORKER = HERE / "trainer_zero3_worker.py"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    import trainer_zero3_worker

    out = tmp_path_factory.mktemp("trainer")
    in_process(trainer_zero3_worker.reference, out)
    stages = (
        ["--tag", "s3"],
        ["--stage", "2", "--tag", "s2"],  # stage 1: the same kind (test_distributed runs it in an engine loop)
        ["--stage", "0", "--tag", "s0"],
    )
    for args in stages:
        check(torchrun(WORKER, str(out), *args), args)
    return out


@pytest.mark.parametrize("stage", [3, 2, 0])
def test_trainer_under_deepspeed_zero_matches_one_process(runs, stage):
    """Stage 0: no DeepSpeed, the Trainer's own DDP."""
    one = torch.load(runs / "trainer-reference.pt", weights_only=False)
    ranks = [torch.load(runs / f"trainer-s{stage}-rank{k}.pt", weights_only=False) for k in (0, 1)]
    for rank in ranks:
        assert rank["kinds"] == {3: ["zero3"], 2: ["zero12"], 0: ["dense"]}[stage]
        assert _structure(rank["history"]) == _structure(one["history"]) and len(one["history"]) == 2 * 12
        for name, w in one["weights"].items():
            assert float((rank["weights"][name] - w).detach().norm() / w.norm()) < 1e-5, (stage, name)


def test_trainer_zero3_resumed_after_a_kill_ends_where_the_run_ends(runs):
    """Killed after step 18 (its last checkpoint: step 15, with SRLoRA's state per rank), then
    trainer.train(resume_from_checkpoint=True): bit-equal to the uninterrupted run."""
    check(torchrun(WORKER, str(runs), "--stop-at", "18", "--tag", "killed"))
    folder = runs / "trainer-killed"
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-15"]
    assert {"srlora_state.rank00000.pt", "srlora_state.rank00001.pt"} <= {
        p.name for p in (folder / "checkpoint-15").iterdir()
    }
    check(torchrun(WORKER, str(runs), "--resume", "--tag", "killed"))
    for k in (0, 1):
        straight = torch.load(runs / f"trainer-s3-rank{k}.pt", weights_only=False)
        again = torch.load(runs / f"trainer-killed-rank{k}.pt", weights_only=False)
        assert again["history"] == straight["history"]
        for name, w in straight["weights"].items():
            assert torch.equal(again["weights"][name], w), name


def test_trl_sft_trainer_under_zero3_zero2_and_ddp_matches_one_process(tmp_path):
    pytest.importorskip("trl")
    import trl_zero3_worker

    for extra in ([], ["--stage", "2"], ["--ddp"]):
        check(torchrun(HERE / "trl_zero3_worker.py", str(tmp_path), *extra), extra)
    in_process(trl_zero3_worker.main, [str(tmp_path), "--single"])
    one = torch.load(tmp_path / "trl-single.pt", weights_only=False)
    assert one["kinds"] == ["dense"] and len(one["history"]) == 2 * 6
    for tag, kind in (("trl-zero3", "zero3"), ("trl-zero2", "zero12"), ("trl-ddp", "dense")):
        for k in (0, 1):
            rank = torch.load(tmp_path / f"{tag}-rank{k}.pt", weights_only=False)
            assert rank["kinds"] == [kind] and _structure(rank["history"]) == _structure(one["history"]), tag
            for name, w in one["weights"].items():
                assert float((rank["weights"][name] - w).detach().norm() / w.norm()) < 1e-5, (tag, name)


@pytest.mark.parametrize("how", ["zero3", "zero2", "ddp"])
def test_an_accelerate_loop_under_zero3_zero2_or_ddp_matches_one_process(runs, how):
    """A user's loop (accelerator.backward, optimizer.step) with SRLoRA built before prepare and
    attached to the optimizer prepare returns: DeepSpeed ZeRO-3 or ZeRO-2 (its plugin), or DDP."""
    args = {"zero3": [], "zero2": ["--stage", "2"], "ddp": ["--ddp"]}[how]
    check(torchrun(HERE / "accelerate_zero3_worker.py", str(runs), *args))
    one = torch.load(runs / "trainer-reference.pt", weights_only=False)
    for k in (0, 1):
        rank = torch.load(runs / f"accelerate-{how}-rank{k}.pt", weights_only=False)
        assert rank["kinds"] == [{"zero3": "zero3", "zero2": "zero12", "ddp": "dense"}[how]]
        assert _structure(rank["history"]) == _structure(one["history"])
        for name, w in one["weights"].items():
            assert float((rank["weights"][name] - w).detach().norm() / w.norm()) < 1e-5, name
