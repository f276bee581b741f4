"""Checkpoints written by an earlier version of srlora (tests/data/legacy, recorded by its
make.py with the code of commit 9b82d8b) still load bit for bit, and the run goes on as it went
on under that version: the same switches, the same scores and weights (bit for bit on the CPU
that recorded them, within float32 rounding on another)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import adam, build, train

from srlora import load_checkpoint

DATA = Path(__file__).parent / "data" / "legacy"


def _recorder():
    """tests/data/legacy/make.py, which recorded the runs: its table of runs is the one used here."""
    spec = importlib.util.spec_from_file_location("legacy_make", DATA / "make.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_MAKE = _recorder()
RUNS, BEFORE, AFTER = _MAKE.RUNS, _MAKE.BEFORE, _MAKE.AFTER
# What a recorded option meant then, where its meaning changed since: under gradient_subspace,
# entry_scale=None was 1.0 (it is 0.25 now).
MEANT = {"mlp-subspace-unscaled": {"entry_scale": 1.0}}


@pytest.fixture
def one_thread():
    """The runs were recorded on one thread: float sums are bit-equal only at a fixed count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(RUNS))
@pytest.mark.filterwarnings("ignore::srlora.SRLoRAWarning")
def test_an_earlier_versions_checkpoint_resumes_exactly(name, one_thread):
    case, options = RUNS[name]
    options = {**options, **MEANT.get(name, {})}
    torch.manual_seed(0)
    model, ctl = build(case, r=2, r_target=8, switch_interval=10, total_steps=BEFORE + AFTER, **options)
    opt = adam(model)
    assert load_checkpoint(DATA / f"{name}.ckpt", model, ctl, opt) == BEFORE
    # Loaded exactly: the model and the optimizer hold what was saved, bit for bit.
    saved = torch.load(DATA / f"{name}.ckpt", weights_only=False)
    state = model.state_dict()
    kept = [key for key in saved["model"] if key in state]  # the checkpoint keeps what training changes
    assert any("lora_A" in key for key in kept) and any("base_layer.weight" in key for key in kept)
    for key in kept:
        assert torch.equal(state[key], saved["model"][key]), key
    assert ctl.global_step == BEFORE and len(ctl.history) == len(saved["controller"]["history"])
    train(model, case, opt, steps=AFTER, seed=2, ctl=ctl)
    final = torch.load(DATA / f"{name}.final.pt", weights_only=True)
    history = [e.to_dict() for e in ctl.history]
    # The same switches, exactly: which slots, which directions, which pairs left. The scores
    # that chose them are float32 sums (an EMA of |grad x weight|), equal on the CPU that
    # recorded them and within float32 rounding (~1e-7 relative) on another CPU's kernels.
    decided = [{k: v for k, v in e.items() if k != "scores"} for e in history]
    assert decided == [{k: v for k, v in e.items() if k != "scores"} for e in final["history"]]
    torch.testing.assert_close(
        [torch.tensor(e["scores"], dtype=torch.float64) for e in history],
        [torch.tensor(e["scores"], dtype=torch.float64) for e in final["history"]],
        rtol=1e-5,
        atol=0,
    )
    assert any(e["step"] > BEFORE for e in final["history"]), "the recorded run must switch after the checkpoint"
    state = model.state_dict()
    assert set(state) == set(final["model"])
    # Bit for bit on the CPU that recorded them; another CPU's kernels may round sums
    # differently, by float32 rounding amplified over 15 AdamW steps at lr 1e-2 (Adam divides
    # by the root of small second moments): up to 1.2e-5 seen on an AMD EPYC against the
    # recording CPU. A wrong switch or a lost moment moves weights by ~1e-2, 100x the bound.
    for key, value in final["model"].items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=1e-4, msg=key)


@pytest.mark.filterwarnings("ignore::srlora.SRLoRAWarning")
def test_a_checkpoint_saved_when_the_default_scale_was_1_refuses_todays_default():
    """A gradient-subspace run saved with entry_scale=None (1.0 then) is refused by a controller
    built with today's default (0.25), with the fix named; built with 1.0 it loads (above)."""
    from srlora.errors import CheckpointError

    case, options = RUNS["mlp-subspace-unscaled"]
    model, ctl = build(case, r=2, r_target=8, switch_interval=10, total_steps=BEFORE + AFTER, **options)
    assert ctl.config.entry_scale == 0.25
    with pytest.raises(CheckpointError, match=r"entry_scale=1\.0 \(here 0\.25\)"):
        load_checkpoint(DATA / "mlp-subspace-unscaled.ckpt", model, ctl, adam(model))
