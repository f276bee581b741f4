"""Optimizer-state surgery: recycled rows of A / columns of B reset, everything else untouched."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import adam, build, train

from srlora import UnsupportedOptimizerWarning
from srlora.targets import find_lora_targets


def _snapshot(opt):
    return {id(p): {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)} for p, s in opt.state.items()}


def _check_reset(opt, model, ctl, events, before, keys):
    lora = {t.name: t for t in find_lora_targets(model, "default")}
    touched = set()
    for ev in events:
        t = lora[ev.layer]
        slots = list(ev.slots)
        keep = [k for k in range(t.r) if k not in slots]
        for param, dim in ((t.lora_A, 0), (t.lora_B, 1)):
            touched.add(id(param))
            for key in keys:
                buf = opt.state[param][key]
                old = before[id(param)][key]
                recycled = buf.index_select(dim, torch.tensor(slots))
                assert torch.all(recycled == 0), (ev.layer, key)
                assert torch.equal(buf.index_select(dim, torch.tensor(keep)), old.index_select(dim, torch.tensor(keep)))
                assert bool((old.index_select(dim, torch.tensor(slots)) != 0).any()), "test needs non-zero moments"
    # Parameters outside the switched layers keep their state bit for bit.
    for p, s in opt.state.items():
        if id(p) not in touched:
            for k, v in s.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, before[id(p)][k])


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_moments_of_recycled_pairs_are_zero(case_name, amsgrad):
    model, ctl = build(case_name, r=4, r_target=16, optimizer_reset="zero", switch_interval=1000)
    opt = adam(model, amsgrad=amsgrad)
    train(model, case_name, opt, steps=4, ctl=ctl)
    before = _snapshot(opt)
    events = ctl.switch(opt)
    keys = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
    _check_reset(opt, model, ctl, events, before, keys)


def test_sgd_momentum_of_recycled_pairs_is_zero():
    model, ctl = build("bert", r=4, r_target=16, switch_interval=1000)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2, momentum=0.9)
    train(model, "bert", opt, steps=3, ctl=ctl)
    before = _snapshot(opt)
    events = ctl.switch(opt)
    _check_reset(opt, model, ctl, events, before, ["momentum_buffer"])


def test_no_reset_leaves_state_alone():
    model, ctl = build("mlp", r=4, r_target=16, optimizer_reset="none", switch_interval=1000)
    opt = adam(model)
    train(model, "mlp", opt, steps=3, ctl=ctl)
    before = _snapshot(opt)
    ctl.switch(opt)
    for p, s in opt.state.items():
        for k, v in s.items():
            assert torch.equal(v, before[id(p)][k])


def test_seed_mode_first_step_is_small_not_3x():
    """Default 'seed': moments zero at the switch; at the next step exp_avg_sq of the
    recycled entries is g^2 (1 - beta2^t), so Adam's v_hat = g^2 and the first step is
    (1 - beta1) / (1 - beta1^(t+1)) * lr per entry; plain zeroing gives ~3.2 lr."""
    lr, b1, b2 = 1e-3, 0.9, 0.999
    steps = {}
    for mode in ("seed", "zero"):
        model, ctl = build("mlp", r=4, r_target=16, optimizer_reset=mode, switch_interval=1000)
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr, betas=(b1, b2))
        ctl.attach(opt)
        train(model, "mlp", opt, steps=200)
        (ev, *_) = ctl.switch()
        t = next(t for t in find_lora_targets(model, "default") if t.name == ev.layer)
        state = opt.state[t.lora_A]
        assert torch.all(state["exp_avg"][list(ev.slots)] == 0)
        assert torch.all(state["exp_avg_sq"][list(ev.slots)] == 0)
        before = t.lora_A.detach().clone()
        train(model, "mlp", opt, steps=1, seed=7)
        delta = (t.lora_A.detach() - before)[list(ev.slots)].abs()
        steps[mode] = delta[delta > 0].median().item() / lr
        if mode == "seed":
            tcount = state["step"].item()
            expected = (1 - b1) / (1 - b1**tcount)
            # The entries whose gradient dwarfs eps take exactly the expected step.
            assert steps[mode] == pytest.approx(expected, rel=1e-3)
        else:
            # Zeroed moments: m_hat = (1-b1) g / (1-b1^t), v_hat = (1-b2) g^2 / (1-b2^t);
            # this tends to (1-b1)/sqrt(1-b2) = 3.16 as t grows (1.35 at t = 201).
            tcount = state["step"].item()
            expected = (1 - b1) / (1 - b1**tcount) / ((1 - b2) / (1 - b2**tcount)) ** 0.5
            assert steps[mode] == pytest.approx(expected, rel=1e-3)
    assert steps["seed"] < steps["zero"] / 10


def test_unsupported_optimizer_warns_once():
    model, ctl = build("mlp", r=4, r_target=16, switch_interval=1000)
    opt = torch.optim.RMSprop([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with pytest.warns(UnsupportedOptimizerWarning, match="RMSprop"):
        ctl.attach(opt)
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        train(model, "mlp", opt, steps=2)
        ctl.switch()
        ctl.detach()
        ctl.attach(opt)
    assert again == []  # warned once only, also when attached again
