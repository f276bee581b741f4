"""The library's guarantees (docs/INTEGRATIONS.md, "Guarantees"): untrusted checkpoints are
never unpickled, a checkpoint or a model that does not fit is refused before anything
changes, a killed save leaves nothing behind, and bad numerics never reach the frozen weight.
Each test names the case of issue 10 it reproduces."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import warnings

import peft
import pytest
import torch
from conftest import CASES, MLP, adam, build, logits, make_peft, train

from srlora import SRLoRA, SRLoRAConfig, load_checkpoint, save_checkpoint
from srlora.checkpoint import read_checkpoint, restore_method_state
from srlora.errors import CheckpointError, NonFiniteWarning


class _Payload:
    """Runs code when unpickled (as a hostile checkpoint would)."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _trained(tmp_path, steps: int = 25, **config):
    config = {"r": 4, "r_target": 16, "gamma": 0.5, "total_steps": 100, **config}
    model, ctl = build("mlp", **config)
    opt = adam(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    ctl.attach(opt)
    train(model, "mlp", opt, steps=steps)
    path = tmp_path / "c.ckpt"
    save_checkpoint(path, model, ctl, opt, lr_scheduler=sched)
    return model, ctl, opt, sched, path


def _fresh(**config):
    config = {"r": 4, "r_target": 16, "gamma": 0.5, "total_steps": 100, **config}
    model, ctl = build("mlp", **config)
    opt = adam(model)
    return model, ctl, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)


def _snapshot(model, ctl, opt):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        ctl.state_dict(),
        repr(opt.state_dict()),
    )


def _assert_unchanged(before, model, ctl, opt):
    model_sd, ctl_sd, opt_repr = before
    for k, v in model.state_dict().items():
        assert torch.equal(v, model_sd[k]), k
    after = ctl.state_dict()
    assert after["global_step"] == ctl_sd["global_step"] and after["history"] == ctl_sd["history"]
    for name, layer in ctl_sd["layers"].items():
        assert after["layers"][name]["pointer"] == layer["pointer"]
        for key, t in layer["importance"].items():
            assert torch.equal(after["layers"][name]["importance"][key], t)
    assert repr(opt.state_dict()) == opt_repr


# -------------------------------------------------------------- 1. untrusted files
def test_1_a_pickled_object_in_a_checkpoint_is_refused_not_run(tmp_path):
    _, _, _, _, path = _trained(tmp_path)
    marker = tmp_path / "ran"
    payload = torch.load(path, weights_only=True)
    payload["extra"] = {"x": _Payload(str(marker))}
    torch.save(payload, path)
    model, ctl, opt, sched = _fresh()
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        load_checkpoint(path, model, ctl, opt, lr_scheduler=sched)
    with pytest.raises(CheckpointError, match="holds objects other than tensors"):
        restore_method_state(path, model, ctl)  # the Trainer callback's reader
    assert not marker.exists()


def test_1_a_real_checkpoint_with_scheduler_loads_weights_only(tmp_path):
    model, ctl, _, sched, path = _trained(tmp_path, steps=45)  # switched twice
    model2, ctl2, opt2, sched2 = _fresh()
    assert load_checkpoint(path, model2, ctl2, opt2, lr_scheduler=sched2) == 45
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    assert ctl2.history == ctl.history and sched2.state_dict() == sched.state_dict()


# -------------------------------------------------------------- 6. killed writers
def test_6_a_save_killed_mid_write_keeps_the_old_file_and_the_next_save_cleans_up(tmp_path):
    model, ctl, opt, sched, path = _trained(tmp_path)
    before = path.read_bytes()
    code = (
        "import os, sys; from srlora.atomic import atomic_write;"
        "atomic_write(sys.argv[1], lambda fh: (fh.write(b'x' * 1_000_000), fh.flush(), os.kill(os.getpid(), 9)))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)])
    assert done.returncode == -9
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".c.ckpt.tmp-")]
    assert len(leftovers) == 1 and path.read_bytes() == before
    old = time.time() - 60  # the killed writer's file has not been written to for a minute
    os.utime(leftovers[0], (old, old))
    save_checkpoint(path, model, ctl, opt, lr_scheduler=sched)
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]


# -------------------------------------------------------------- 7. refuse before changing
@pytest.mark.parametrize(
    "case",
    ["other-param-groups", "no-optimizer", "scheduler-not-saved", "smaller-r_target", "other-gamma", "other-total"],
)
def test_7_load_refuses_a_checkpoint_that_does_not_fit_before_changing_anything(tmp_path, case):
    _, _, _, _, path = _trained(tmp_path, steps=45)
    if case == "no-optimizer":
        payload = torch.load(path, weights_only=True)
        del payload["optimizer"]
        torch.save(payload, path)
    if case == "scheduler-not-saved":
        payload = torch.load(path, weights_only=True)
        payload["lr_scheduler"] = None
        torch.save(payload, path)
    config = {"smaller-r_target": {"r_target": 12}, "other-gamma": {"gamma": 0.25}, "other-total": {"total_steps": 90}}
    model, ctl, opt, sched = _fresh(**config.get(case, {}))
    if case == "other-param-groups":
        lora = [p for n, p in model.named_parameters() if "lora_" in n]
        rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
        opt = torch.optim.AdamW([{"params": lora}, {"params": rest, "lr": 1e-4}])
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train(model, "mlp", opt, steps=3, ctl=ctl)  # some state of its own to keep
    before = _snapshot(model, ctl, opt)
    expected = {
        "other-param-groups": "parameter group",
        "no-optimizer": "no 'optimizer' entry",
        "scheduler-not-saved": "without a learning-rate scheduler",
        "smaller-r_target": "r_target=16 \\(here 12\\)",
        "other-gamma": "gamma=0.5 \\(here 0.25\\)",
        "other-total": "total_steps=100 \\(here 90\\)",
    }[case]
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, model, ctl, opt, lr_scheduler=sched)
    _assert_unchanged(before, model, ctl, opt)


def test_7_another_base_model_is_refused_after_every_layer_switched(tmp_path):
    _, ctl, _, _, path = _trained(tmp_path, steps=45)
    assert all(layer.has_switched for layer in ctl.layers.values())  # no frozen fingerprint left to compare
    model = make_peft(CASES["mlp"], seed=7, r=4)  # other pretrained weights
    ctl2 = SRLoRA(model, SRLoRAConfig(r_target=16, gamma=0.5, total_steps=100, switch_interval=20))
    opt = adam(model)
    before = _snapshot(model, ctl2, opt)
    with pytest.raises(CheckpointError, match="pretrained weight differs"):
        load_checkpoint(path, model, ctl2, opt)
    _assert_unchanged(before, model, ctl2, opt)


# -------------------------------------------------------------- 8. the constructor
@pytest.mark.parametrize("case", ["total-too-short", "rank-pattern"])
def test_8_srlora_refuses_a_model_before_touching_any_weight(case):
    if case == "rank-pattern":  # fc1 (checked first) fits; fc2's r=3 gives gamma * r = 1.5
        model = make_peft(CASES["mlp"], r=4, rank_pattern={"fc2": 3})
        config, match = SRLoRAConfig(r_target=16, gamma=0.5, total_steps=100), "whole number"
    else:
        model = make_peft(CASES["mlp"], r=4)
        config, match = SRLoRAConfig(r_target=16, gamma=0.5, total_steps=5), "shorter than the N_switch"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=match):
        SRLoRA(model, config)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


# -------------------------------------------------------------- 9. the optimizer
def test_9_attach_and_switch_refuse_an_optimizer_that_does_not_train_the_adapter():
    model, ctl = build("mlp", r=4, r_target=16)
    head_only = torch.optim.AdamW(model.base_model.model.head.parameters())
    with pytest.raises(ValueError, match="does not hold the LoRA parameters of 2 of 2 layers"):
        ctl.attach(head_only)
    assert not ctl.attached
    opt = adam(model)
    ctl.attach(opt)
    with pytest.raises(ValueError, match="bound to another optimizer"):
        ctl.switch(adam(model))
    assert ctl.history == []
    ctl.switch(opt)  # the attached one is fine
    assert len(ctl.history) == 2


# -------------------------------------------------------------- 10. unreadable files
@pytest.mark.parametrize("damage", ["truncated", "empty", "random", "no-controller", "not-a-dict"])
def test_10_an_unreadable_checkpoint_gives_one_error_naming_the_file(tmp_path, damage):
    _, _, _, _, path = _trained(tmp_path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random":
        path.write_bytes(os.urandom(4096))
    elif damage == "no-controller":
        payload = torch.load(path, weights_only=True)
        del payload["controller"]
        torch.save(payload, path)
    else:
        torch.save([1, 2, 3], path)
    model, ctl, opt, _ = _fresh()
    before = _snapshot(model, ctl, opt)
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path, model, ctl, opt)
    _assert_unchanged(before, model, ctl, opt)
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        read_checkpoint(tmp_path / "missing.ckpt")


# -------------------------------------------------------------- 11. fp16
def test_11_large_but_finite_fp16_gradients_are_not_counted_as_skipped():
    _, ctl = build("mlp", r=4, r_target=16, switch_interval=1000)
    for layer in ctl.layers.values():
        for p in (layer.target.lora_A, layer.target.lora_B):
            p.data = p.data.half()
            # Every entry finite (60000 < 65504), but the 2-norm of the tensor overflows fp16.
            p.grad = torch.full_like(p.data, 60000.0)
    assert ctl.update_importance()
    assert ctl.skipped_steps == 0
    assert all(torch.isfinite(s).all() and (s > 0).all() for s in ctl.pair_scores().values())
    next(iter(ctl.layers.values())).target.lora_B.grad[0, 0] = float("inf")
    with pytest.warns(NonFiniteWarning):
        assert not ctl.update_importance()
    assert ctl.skipped_steps == 1


# -------------------------------------------------------------- 12. non-finite pairs
def test_12_a_non_finite_pair_is_never_fused_into_the_frozen_weight():
    model, ctl = build("mlp", r=4, r_target=16, switch_interval=1000)
    opt = adam(model)
    ctl.attach(opt)
    train(model, "mlp", opt, steps=3)
    bad, good = list(ctl.layers.values())
    bad.target.lora_A.data[1, 2] = float("nan")
    frozen = bad.target.weight.clone()
    with pytest.warns(NonFiniteWarning, match="non-finite LoRA weights"):
        events = ctl.switch()
    assert [e.layer for e in events] == [good.name] and ctl.skipped_switches == 1
    assert torch.equal(bad.target.weight, frozen) and torch.isfinite(bad.target.weight).all()
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        ctl.switch()
    assert [w for w in again if issubclass(w.category, NonFiniteWarning)] == []  # warned once
    assert ctl.skipped_switches == 2 and ctl.state_dict()["skipped_switches"] == 2


# -------------------------------------------------------------- 17. narrow layers
def test_17_a_layer_narrower_than_r_target_gets_its_schedule_from_the_clamped_budget():
    torch.manual_seed(0)
    base = MLP(d_in=48, d_hidden=80)  # fc1 80x48 and fc2 48x80: min(m, n) = 48 < r_target = 64
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=8, target_modules=["fc1", "fc2"]))
    with pytest.warns(UserWarning, match="clamped value") as record:
        ctl = SRLoRA(model, SRLoRAConfig(r_target=64, gamma=0.5, total_steps=200))
    assert len([w for w in record if "clamped" in str(w.message)]) == 1
    # N_switch = (48 - 8) / 4 = 10 (not (64 - 8) / 4 = 14), so t_interval = 200 // 10 = 20.
    schedule = ctl.schedule()
    assert (schedule.num_switches, schedule.interval) == (10, 20)
    opt = adam(model, lr=1e-3)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        x = torch.randn(8, 48, generator=g)
        torch.nn.functional.cross_entropy(model(x), torch.randint(0, 5, (8,), generator=g)).backward()
        opt.step()
        opt.zero_grad()
    # The budget is spread over the run: switches at 20, 40, ..., 180 (the 10th would fall on the last
    # step), 8 + 9 * 4 = 44 directions used, and no layer runs out of directions on the way.
    assert sorted({e.step for e in ctl.history}) == list(range(20, 200, 20))
    assert set(ctl.directions_used().values()) == {44}
    assert not any(layer.exhausted for layer in ctl.layers.values())


def test_17_output_is_unchanged_by_a_refused_load(tmp_path):
    """A refused load leaves the model computing what it computed before."""
    _, _, _, _, path = _trained(tmp_path)
    model, ctl, opt, _ = _fresh(gamma=0.25)
    before = logits("mlp", model)
    with pytest.raises(CheckpointError):
        load_checkpoint(path, model, ctl, opt)
    torch.testing.assert_close(logits("mlp", model), before, rtol=0, atol=0)
