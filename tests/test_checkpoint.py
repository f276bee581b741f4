"""Checkpoint and exact resume, including after SIGKILL, and atomic writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import adam, build, train

from srlora import load_checkpoint, save_checkpoint

WORKER = Path(__file__).parent / "resume_worker.py"


def _run_worker(*args: str) -> int:
    """The worker in a process of its own, on one thread (as :func:`launch.in_process` runs it)."""
    from launch import python

    return python(WORKER, *args).returncode


def _assert_equal(a, b, path="") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_sigkill_and_resume_is_bit_equal(tmp_path):
    import resume_worker
    from launch import in_process

    ref_out, out = tmp_path / "ref.pt", tmp_path / "resumed.pt"
    in_process(resume_worker.main, [str(tmp_path / "ref.ckpt"), str(ref_out)])  # the uninterrupted run
    ckpt = tmp_path / "run.ckpt"
    # Killed at step 37: the last checkpoint is step 30, after the switch at step 30
    # (N_switch = 6, t = 10) and with seeded second moments pending.
    assert _run_worker(str(ckpt), str(out), "--kill-at", "37") == -9
    assert ckpt.exists() and not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a temporary file was left behind"
    assert _run_worker(str(ckpt), str(out), "--resume") == 0
    ref, res = torch.load(ref_out, weights_only=False), torch.load(out, weights_only=False)
    _assert_equal(ref["model"], res["model"], "model")
    _assert_equal(ref["controller"], res["controller"], "controller")
    _assert_equal(ref["optimizer"], res["optimizer"], "optimizer")
    assert ref["controller"]["history"], "the run must have switched"


def test_resume_without_scores_fails_the_check(tmp_path):
    """Guard for the test above: a resume that loses the importance scores diverges."""
    import resume_worker

    ckpt = tmp_path / "run.ckpt"
    assert _run_worker(str(ckpt), str(tmp_path / "x.pt"), "--kill-at", "37") == -9
    ref = resume_worker.main([str(tmp_path / "r.ckpt"), str(tmp_path / "ref.pt")])
    payload = torch.load(ckpt, weights_only=False)
    for layer in payload["controller"]["layers"].values():
        for t in layer["importance"].values():
            t.zero_()
    torch.save(payload, ckpt)
    res = resume_worker.main([str(ckpt), str(tmp_path / "res.pt"), "--resume"])
    with pytest.raises(AssertionError):
        _assert_equal(ref["model"], res["model"], "model")


def test_crash_during_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    model, ctl = build("mlp", r=4, r_target=16, gamma=0.5, total_steps=100)
    opt = adam(model)
    ctl.attach(opt)
    train(model, "mlp", opt, steps=25)
    ckpt = tmp_path / "c.ckpt"
    save_checkpoint(ckpt, model, ctl, opt, step=25)
    before = ckpt.read_bytes()
    train(model, "mlp", opt, steps=5)

    def dying_save(obj, fh, *a, **k):
        fh.write(b"partial")
        raise KeyboardInterrupt  # stands in for a crash mid-write

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(ckpt, model, ctl, opt, step=30)
    monkeypatch.undo()
    assert ckpt.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]
    fresh, ctl2 = build("mlp", r=4, r_target=16, gamma=0.5, total_steps=100)
    assert load_checkpoint(ckpt, fresh, ctl2, adam(fresh)) == 25


def test_checkpoint_stores_only_switched_frozen_weights(tmp_path):
    model, ctl = build("bert", r=4, r_target=16, gamma=0.5, switch_interval=1000)
    opt = adam(model)
    train(model, "bert", opt, steps=2, ctl=ctl)
    small = save_checkpoint(tmp_path / "a.ckpt", model, ctl, opt)
    ctl.switch(opt)
    big = save_checkpoint(tmp_path / "b.ckpt", model, ctl, opt)
    payload = torch.load(tmp_path / "a.ckpt", weights_only=False)
    assert not any(k.endswith("base_layer.weight") for k in payload["model"])
    assert len(payload["frozen_fingerprints"]) == len(ctl.layer_names)
    assert big > small


def test_load_into_a_different_model_is_refused(tmp_path):
    model, ctl = build("mlp", r=4, r_target=16, switch_interval=1000)
    opt = adam(model)
    save_checkpoint(tmp_path / "c.ckpt", model, ctl, opt)
    other, ctl2 = build("mlp", seed=7, r=4, r_target=16, switch_interval=1000)
    with pytest.raises(ValueError, match="differs from the one the checkpoint was saved against"):
        load_checkpoint(tmp_path / "c.ckpt", other, ctl2, adam(other))


def test_fused_records_off_resumes_and_refuses_a_controller_that_expects_them(tmp_path):
    """A run without records resumes exactly; its state does not load into a controller that
    keeps records (they were never kept), while a state with records loads into one without."""
    from srlora.errors import CheckpointError

    def run(keep: bool, steps: int, resume: Path | None = None, save: Path | None = None):
        model, ctl = build("mlp", r=4, r_target=16, gamma=0.5, switch_interval=20, fused_records=keep)
        opt = adam(model)
        ctl.attach(opt)
        start = 0
        if resume is not None:
            start = load_checkpoint(resume, model, ctl, opt)
        for step in range(start, steps):  # the batch of each step, whoever runs it
            train(model, "mlp", opt, steps=1, seed=100 + step)
        if save is not None:
            save_checkpoint(save, model, ctl, opt, step=steps)
        return model, ctl

    whole, _ = run(False, 50)
    run(False, 25, save=tmp_path / "off.ckpt")
    resumed, ctl = run(False, 50, resume=tmp_path / "off.ckpt")
    assert ctl.history
    _assert_equal(whole.state_dict(), resumed.state_dict(), "model")
    model, ctl = build("mlp", r=4, r_target=16, gamma=0.5, switch_interval=20)
    with pytest.raises(CheckpointError, match="fused_records=False"):
        load_checkpoint(tmp_path / "off.ckpt", model, ctl, adam(model))
    run(True, 25, save=tmp_path / "on.ckpt")
    from_records, _ = run(False, 50, resume=tmp_path / "on.ckpt")
    _assert_equal(whole.state_dict(), from_records.state_dict(), "model")
