"""Importance EMAs (Eq. 3-7): equal to a hand computation, once per optimizer step."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CASES, adam, build, hand_scores

from srlora import SRLoRAWarning
from srlora.targets import find_lora_targets


@pytest.mark.parametrize("attach", [False, True])
@pytest.mark.parametrize("beta1,beta2", [(0.85, 0.85), (0.7, 0.95)])
def test_pair_scores_equal_hand_computation(case_name, attach, beta1, beta2):
    model, ctl = build(case_name, r=4, r_target=16, beta1=beta1, beta2=beta2, switch_interval=1000)
    opt = adam(model, lr=1e-2)
    if attach:
        ctl.attach(opt)
    targets = find_lora_targets(model, "default")
    snaps = {t.name: [] for t in targets}
    case = CASES[case_name]
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        case.loss(model, case.batch(g)).backward()
        for t in targets:
            snaps[t.name].append(
                tuple(x.detach().double().clone() for x in (t.lora_A, t.lora_A.grad, t.lora_B, t.lora_B.grad))
            )
        if not attach:
            ctl.update_importance()
        opt.step()
        if not attach:
            ctl.step(opt)
        opt.zero_grad()
    scores = ctl.pair_scores()
    for t in targets:
        expected = hand_scores(snaps[t.name], beta1, beta2).float()
        # float32 EMAs of float32 products vs a float64 reference: relative error of a
        # few ulps per step, accumulated over 6 steps.
        torch.testing.assert_close(scores[t.name], expected, rtol=1e-5, atol=1e-12)
    assert ctl.global_step == 6


def test_gradient_accumulation_updates_once_per_optimizer_step():
    model, ctl = build("mlp", r=4, r_target=16, switch_interval=1000)
    opt = adam(model)
    ctl.attach(opt)
    case = CASES["mlp"]
    g = torch.Generator().manual_seed(0)
    targets = find_lora_targets(model, "default")
    snaps = []
    for _ in range(3):
        for _ in range(4):  # four micro-batches, one optimizer step
            (case.loss(model, case.batch(g)) / 4).backward()
        t = targets[0]
        snaps.append(tuple(x.detach().double().clone() for x in (t.lora_A, t.lora_A.grad, t.lora_B, t.lora_B.grad)))
        opt.step()
        opt.zero_grad()
    assert ctl.global_step == 3
    torch.testing.assert_close(
        ctl.pair_scores()[targets[0].name], hand_scores(snaps, 0.85, 0.85).float(), rtol=1e-5, atol=1e-12
    )


def test_nonfinite_gradient_step_is_skipped_and_counted():
    model, ctl = build("mlp", r=4, r_target=16, switch_interval=1000)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    case = CASES["mlp"]
    g = torch.Generator().manual_seed(0)
    case.loss(model, case.batch(g)).backward()
    assert ctl.update_importance()
    before = {k: v.clone() for k, v in ctl.pair_scores().items()}
    opt.zero_grad()
    case.loss(model, case.batch(g)).backward()
    target = find_lora_targets(model, "default")[1]
    target.lora_B.grad[0, 0] = float("nan")
    with pytest.warns(SRLoRAWarning, match="Non-finite"):
        assert not ctl.update_importance()
    target.lora_B.grad[0, 0] = float("inf")
    with warnings.catch_warnings(record=True) as again:
        warnings.simplefilter("always")
        assert not ctl.update_importance()
    assert again == []  # warned once only
    assert ctl.skipped_steps == 2
    for k, v in ctl.pair_scores().items():
        assert torch.equal(v, before[k])


def test_manual_calls_refused_while_attached():
    model, ctl = build("mlp")
    ctl.attach(adam(model))
    with pytest.raises(RuntimeError, match="attached"):
        ctl.update_importance()
    with pytest.raises(RuntimeError, match="attached"):
        ctl.step()
    with pytest.raises(RuntimeError, match="already attached"):
        ctl.attach(adam(model))
    ctl.detach()
    ctl.step()
    assert ctl.global_step == 1


@pytest.mark.parametrize("as_kwarg", [False, True])
def test_closure_step_updates_importance_after_the_closure(as_kwarg):
    """optimizer.step(closure): gradients exist only once the closure ran; the scores
    must be made from them (Lightning passes its closure this way)."""
    model, ctl = build("mlp", r=4, r_target=16, switch_interval=1000)
    opt = adam(model)
    ctl.attach(opt)
    case = CASES["mlp"]
    batch = case.batch(torch.Generator().manual_seed(0))
    t = find_lora_targets(model, "default")[0]
    seen = []

    def closure():
        opt.zero_grad()
        loss = case.loss(model, batch)
        loss.backward()
        seen.append(tuple(x.detach().double().clone() for x in (t.lora_A, t.lora_A.grad, t.lora_B, t.lora_B.grad)))
        return loss

    loss = opt.step(closure=closure) if as_kwarg else opt.step(closure)
    assert loss is not None and ctl.global_step == 1
    torch.testing.assert_close(ctl.pair_scores()[t.name], hand_scores(seen, 0.85, 0.85).float(), rtol=1e-5, atol=1e-12)
