"""SRLoRA under FSDP2 whatever fully_shard wraps, and the trained result out of sharded runs
(torchrun, 2 CPU processes, gloo), each against one process on the same global batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from launch import check, entry, in_process, torchrun

HERE = Path(__file__).parent
pytestmark = pytest.mark.distributed


def _structure(history: list[dict]) -> list[tuple]:
    return [(e["step"], e["layer"], e["slots"], e["directions"], e["evicted"]) for e in history]


def test_fsdp2_whatever_fully_shard_wraps(tmp_path):
    """The root only, blocks, each PEFT LoRA layer, each base layer, each lora_A / lora_B leaf,
    a mix, bfloat16 compute with float32 masters, and SRLoRA built before fully_shard: every
    wrap makes the switches one process makes, and (float32) ends at its weights within 1e-5."""
    import fsdp_wraps_worker

    check(torchrun(HERE / "fsdp_wraps_worker.py", str(tmp_path)))
    r0, r1 = (torch.load(tmp_path / f"wraps-rank{k}.pt", weights_only=False) for k in (0, 1))
    one = in_process(fsdp_wraps_worker.run, None, 0, 1)
    assert set(r0) == {"root", "blocks", "lora-layer", "base-layer", "leaf", "mix", "blocks-bf16", "built-before"}
    for how, run in r0.items():
        assert "error" not in run, (how, run.get("error"))
        assert run["kinds"] == ["fsdp2"] and run["masters"] == ["torch.float32"], how
        assert _structure(run["history"]) == _structure(r1[how]["history"]), how
        assert _structure(run["history"]) == _structure(one["history"]) and len(one["history"]) == 3 * 12, how
        assert run["switch_moved"] < 1e-5, how  # a switch leaves the function unchanged
        errors = [float((run["weights"][n] - w).norm() / w.norm()) for n, w in one["weights"].items()]
        # bfloat16 compute takes another trajectory than float32 over 35 steps at lr 1e-2
        # (~10% here); the float32 wraps agree with one process to float rounding.
        assert max(errors) < (0.3 if how == "blocks-bf16" else 1e-5), (how, max(errors))


# (how the model is split, what enters at a switch): FSDP2 and ZeRO-1/2/3 with the paper's
# entries; FSDP2, ZeRO-2 and ZeRO-3 with issue 24's (the gradient subspace at half the first
# pairs' scale: sketches summed over ranks, records of the entered pairs).
# The same gradient subspace with W0's top 4 directions left alone (FSDP2, ZeRO-2, ZeRO-3) and
# with LoRA's first pairs (FSDP2, ZeRO-3); with no record of the fused pairs (the export
# takes the base's weights); and whitened by a general batch's input covariance (subspace_whiten).
EXPORTED = [
    ("fsdp", "paper"),
    ("zero2", "paper"),
    ("zero3", "paper"),
    ("fsdp", "subspace"),
    ("zero3", "subspace"),
    ("fsdp", "left-alone"),
    ("zero3", "left-alone"),
    ("fsdp", "lora-start"),
    ("zero3", "lora-start"),
    ("fsdp", "no-records"),
    ("zero3", "no-records"),
    ("fsdp", "whitened"),
    ("zero3", "whitened"),
]


@pytest.fixture(scope="module")
def sharded_results(tmp_path_factory) -> Path:
    """One trained run per split and entry, all on the same 2 ranks in one launch, each exported
    and merged; and the one-process reference of each entry, run here."""
    pytest.importorskip("deepspeed")
    from sharded_worker import train_and_export

    out = tmp_path_factory.mktemp("sharded")
    check(torchrun(HERE / "sharded_worker.py", str(out), "--runs", *(f"{m}:{e}" for m, e in EXPORTED)))
    refs = {e: in_process(train_and_export, "reference", e, out) for e in sorted({e for _, e in EXPORTED})}
    torch.save(refs, out / "references.pt")
    return out


def _exported(out: Path, mode: str, entry_: str) -> tuple[dict, list[dict]]:
    """The one-process reference of ``entry_`` and both ranks' results of ``mode``."""
    ref = torch.load(out / "references.pt", weights_only=False)[entry_]
    return ref, [entry(out / f"sharded-rank{k}.pt", f"{mode}:{entry_}") for k in (0, 1)]


@pytest.mark.parametrize("mode,entry", EXPORTED)
def test_export_of_a_sharded_run_loads_in_plain_peft_and_equals_one_process(sharded_results, mode, entry):
    import peft
    from conftest import CASES, make_base
    from safetensors.torch import load_file
    from sharded_worker import batch

    out = sharded_results
    ref, ranks = _exported(out, mode, entry)
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
    ref, ranks = _exported(sharded_results, mode, entry)
    # The merged model computes what the trained one did (each rank on its half of the batch) ...
    torch.testing.assert_close(
        torch.cat([r["merged_logits"] for r in ranks]), torch.cat([r["trained"] for r in ranks]), rtol=1e-5, atol=1e-5
    )
    # ... and holds, gathered whole, the weights one process merges, with no LoRA module left.
    assert set(ranks[0]["merged"]) == set(ref["merged"]) and not any("lora_" in k for k in ref["merged"])
    for key, value in ref["merged"].items():
        torch.testing.assert_close(ranks[0]["merged"][key], value, rtol=1e-5, atol=1e-5, msg=key)
