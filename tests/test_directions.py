"""direction_policy="gradient": the switch brings in the unused directions best aligned with
the full-weight gradient, captured only in a window before each switch."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import CASES, adam, build, logits

from srlora import SRLoRA, SRLoRAConfig, load_checkpoint, save_checkpoint

M = N = 16
TARGET = 5  # an unused direction: 0 and 1 start in the slots, the spectrum would bring 2 next


def _single_layer(policy: str, seed: int = 0):
    """A bias-free Linear with a known SVD: W0 = U diag(16, 15, ..., 1) V^T."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(M, M, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    S = torch.arange(16, 0, -1, dtype=torch.float64)
    base = torch.nn.Sequential(torch.nn.Linear(N, M, bias=False))
    with torch.no_grad():
        base[0].weight.copy_((U * S) @ V.T)
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=2, target_modules=["0"]))
    cfg = SRLoRAConfig(r_target=8, gamma=0.5, switch_interval=20, direction_policy=policy)
    return model, SRLoRA(model, cfg), U.float(), V.float()


def _aligned_steps(model, ctl, opt, U, V, steps: int) -> None:
    """Inputs along v_5 and a loss whose output gradient is -u_5: G = -T u_5 v_5^T, so
    u_i^T G v_i is zero for every direction but the 5th."""
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = V[:, TARGET] * (1 + torch.rand(8, 1, generator=g))
        (-(model(x) @ U[:, TARGET]).sum()).backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("policy,expected", [("gradient", TARGET), ("spectrum", 2)])
def test_the_direction_the_gradient_lies_along_is_brought_in(policy, expected):
    model, ctl, U, V = _single_layer(policy)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    ctl.attach(opt)
    _aligned_steps(model, ctl, opt, U, V, 20)  # the switch after step 20
    assert [e.step for e in ctl.history] == [20]
    assert ctl.history[0].directions == (expected,)
    assert expected in ctl.slot_directions()[ctl.layer_names[0]]
    layer = ctl.layers[ctl.layer_names[0]]
    assert layer.used.nonzero().flatten().tolist() == sorted([0, 1, expected])


def test_the_captured_alignment_is_u_G_v_of_the_accumulated_gradient():
    """Two micro-batches per step: the probe's sum equals u_i^T G v_i with G = dL/dW from
    autograd (W made trainable for the reference only)."""
    model, ctl, _, _ = _single_layer("gradient")
    ctl.directions.update_windows(20)  # open the window of the switch after step 20
    probe = ctl.directions.probes[ctl.layer_names[0]]
    assert probe.armed
    layer = ctl.layers[ctl.layer_names[0]]
    W = layer.target.base_param
    W.requires_grad_(True)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):  # gradient accumulation
        x = torch.randn(4, 3, N, generator=g)  # any leading shape
        (model(x) ** 2).mean().backward()
    cand = layer.unused_directions()
    U, _, V = layer.cache.directions(cand, torch.device("cpu"))
    expected = torch.einsum("mi,mn,ni->i", U.double(), W.grad.double(), V.double())
    torch.testing.assert_close(probe.step_sum[cand].double(), expected, rtol=1e-5, atol=1e-7)
    W.requires_grad_(False)
    # Evaluation (no grad) adds nothing; a fold enters the step into the EMA once.
    before = probe.step_sum.clone()
    with torch.no_grad():
        model(torch.randn(5, N, generator=g))
    assert torch.equal(probe.step_sum, before)
    probe.fold()
    torch.testing.assert_close(probe.ema, (1 - 0.85) * before)
    assert probe.steps_seen == 1 and not probe.step_sum.any()


def test_hooks_run_only_in_the_window_before_each_switch():
    model, ctl = build("mlp", r=4, r_target=16, switch_interval=40, direction_policy="gradient")
    opt = adam(model)
    ctl.attach(opt)
    armed_on = []
    case = CASES["mlp"]
    g = torch.Generator().manual_seed(0)
    for step in range(1, 81):
        probe = next(iter(ctl.directions.probes.values()))
        armed_on.append(probe.armed)
        hooks = sum(len(m._forward_hooks) for m in model.modules())
        assert hooks == (2 if probe.armed else 0), step
        case.loss(model, case.batch(g)).backward()
        opt.step()
        opt.zero_grad()
    # Window K = 19 steps: steps 22-40 and 62-80 are captured, the rest not.
    assert [i + 1 for i, a in enumerate(armed_on) if a] == [*range(22, 41), *range(62, 81)]
    assert {e.step for e in ctl.history} == {40, 80}


def test_a_gradient_switch_leaves_the_output_unchanged(case_name):
    model, ctl = build(case_name, r=4, r_target=16, switch_interval=30, direction_policy="gradient")
    opt = adam(model)
    ctl.attach(opt)
    case = CASES[case_name]
    g = torch.Generator().manual_seed(0)
    for _ in range(29):  # 18 captured steps of the window before step 30
        case.loss(model, case.batch(g)).backward()
        opt.step()
        opt.zero_grad()
    before = logits(case_name, model)
    events = ctl.switch()
    assert events and any(e.directions != tuple(range(4, 6)) for e in events), "the gradient chose differently"
    torch.testing.assert_close(logits(case_name, model), before, rtol=1e-5, atol=1e-5)


def _steps(model, opt, start: int, stop: int) -> None:
    case = CASES["mlp"]
    for step in range(start, stop):
        case.loss(model, case.batch(torch.Generator().manual_seed(100 + step))).backward()
        opt.step()
        opt.zero_grad()


def test_resume_inside_a_capture_window_is_exact(tmp_path):
    config = dict(r=4, r_target=16, switch_interval=20, direction_policy="gradient")
    model, ctl = build("mlp", **config)
    opt = adam(model)
    ctl.attach(opt)
    _steps(model, opt, 0, 30)  # step 30 is inside the window of the switch after step 40
    assert next(iter(ctl.directions.probes.values())).armed
    save_checkpoint(tmp_path / "c.ckpt", model, ctl, opt)
    _steps(model, opt, 30, 60)

    model2, ctl2 = build("mlp", **config)
    opt2 = adam(model2)
    ctl2.attach(opt2)
    assert load_checkpoint(tmp_path / "c.ckpt", model2, ctl2, opt2) == 30
    _steps(model2, opt2, 30, 60)
    assert ctl2.history == ctl.history and {e.step for e in ctl.history} == {20, 40, 60}
    for (k, v), (k2, v2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), k
    for name, probe in ctl.directions.probes.items():
        assert torch.equal(probe.ema, ctl2.directions.probes[name].ema)


def test_export_is_exact_with_out_of_order_directions(tmp_path):
    model, ctl, U, V = _single_layer("gradient")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    _aligned_steps(model, ctl, opt, U, V, 45)  # switches after 20 and 40
    assert ctl.directions_used() == {ctl.layer_names[0]: 4}
    layer = ctl.layers[ctl.layer_names[0]]
    P, Q = layer.total_update_factors()
    g = torch.Generator().manual_seed(0)
    U0, _ = torch.linalg.qr(torch.randn(M, M, generator=g, dtype=torch.float64))
    V0, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=torch.float64))
    W0 = ((U0 * torch.arange(16, 0, -1, dtype=torch.float64)) @ V0.T).float()
    w_now = layer.target.weight + layer.target.scaling * layer.target.lora_B @ layer.target.lora_A
    torch.testing.assert_close(P @ Q, w_now - W0, rtol=1e-4, atol=1e-4)
