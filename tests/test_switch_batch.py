"""A switch as a few batched operations (srlora.switch): layers of one shape switch
together, so the work of one switch grows with the number of shape groups, not of layers;
and the batched switch does what the layer-by-layer one does."""

from __future__ import annotations

import collections

import peft
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from srlora import SRLoRA, SRLoRAConfig, switch
from srlora.kinds.dense import DenseTarget

SYNCING = {"aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal"}
SHAPES = [(24, 16), (16, 24), (16, 16)]  # (out, in) of the three kinds of layer


class OpCounter(TorchDispatchMode):
    """Every ATen op dispatched inside the block (CPU tensors included: host bookkeeping in
    tensors would count as much as the device work)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def syncs(self) -> int:
        return sum(n for name, n in self.calls.items() if name in SYNCING)


class Tower(nn.Module):
    """``layers`` linear layers cycling through three shapes (16 -> 24 -> 16 -> 16 -> ...)."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(SHAPES[i % 3][1], SHAPES[i % 3][0]) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def _build(layers: int, seed: int = 0, **config) -> tuple[nn.Module, SRLoRA, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    targets = [f"layers.{i}" for i in range(layers)]
    model = peft.get_peft_model(Tower(layers), peft.LoraConfig(r=4, lora_alpha=4, target_modules=targets))
    ctl = SRLoRA(model, SRLoRAConfig(r_target=12, switch_interval=25, **config))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    return model, ctl, opt


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 16, generator=g)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()


def _switch_ops(layers: int) -> OpCounter:
    model, ctl, opt = _build(layers)
    _train(model, opt, 3)  # the optimizer holds moments to reset
    assert len(ctl._groups) == 3 and all(len(g) == layers // 3 for g in ctl._groups)
    with OpCounter() as counter:
        events = ctl.switch(opt)
    assert len(events) == layers
    return counter


def test_switch_op_count_grows_with_shape_groups_not_layers():
    few, many = _switch_ops(12), _switch_ops(36)
    assert many.total == few.total, (few.calls, many.calls)
    assert few.syncs == many.syncs == 0  # the one host read is the transfer of all scores
    # For comparison, layer by layer the count grows with the layers (and is larger).
    assert few.total < 12 * 20


def test_the_next_steps_seed_costs_the_same_for_any_number_of_layers():
    counts = []
    for layers in (12, 36):
        model, ctl, opt = _build(layers)
        _train(model, opt, 24)  # the switch after step 25 ...
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(5))
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        assert len(ctl.history) == layers
        model(x).square().mean().backward()
        with OpCounter() as counter:  # ... is seeded in the pre-hook of step 26
            ctl._pre_step_hook(opt, (opt,), {})
        counts.append(counter.total)
        assert not ctl.optimizer_reset.pending
    assert counts[0] == counts[1]


def _layer_by_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(DenseTarget, "batches", False)


def _compare(model, opt, twin_model, twin_opt, ctl, twin, rtol: float, atol: float) -> None:
    for (name, p), q in zip(model.named_parameters(), twin_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)
    trained = [(p, q) for p, q in zip(model.parameters(), twin_model.parameters(), strict=True) if p.requires_grad]
    for p, q in trained:
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt.state[p][key], twin_opt.state[q][key], rtol=rtol, atol=atol * 1e-2)
    for name, layer in ctl.layers.items():
        torch.testing.assert_close(layer.fused_B, twin.layers[name].fused_B, rtol=rtol, atol=atol)
        for a, b in zip(layer.importance.tensors(), twin.layers[name].importance.tensors(), strict=True):
            torch.testing.assert_close(a, b, rtol=rtol * 10, atol=1e-9)


@pytest.mark.parametrize("reset", ["seed", "zero"])
@pytest.mark.parametrize("scores", ["recycled", "all"])
def test_batched_switches_equal_layer_by_layer(monkeypatch, reset, scores):
    model, ctl, opt = _build(9, optimizer_reset=reset, reset_scores=scores)
    with monkeypatch.context() as m:
        _layer_by_layer(m)
        twin_model, twin, twin_opt = _build(9, optimizer_reset=reset, reset_scores=scores)
    assert [len(g) for g in twin._groups] == [1] * 9 and len(ctl._groups) == 3  # layer by layer: batches of one
    # The first switch (after step 25, and the seeding at step 26): the same up to rounding
    # (one batched product against one per layer: float32 rounding of the switch's update).
    for m_, o_ in ((model, opt), (twin_model, twin_opt)):
        _train(m_, o_, 26)
    _compare(model, opt, twin_model, twin_opt, ctl, twin, rtol=1e-5, atol=1e-6)
    # Two more switches and training between them: the same decisions; the rounding grows
    # with training (lr 1e-2), no more.
    for m_, o_ in ((model, opt), (twin_model, twin_opt)):
        _train(m_, o_, 54, seed=2)
    assert {e.step for e in ctl.history} == {25, 50, 75} and len(ctl.history) == 27
    assert [(e.layer, e.slots, e.directions, e.evicted) for e in ctl.history] == [
        (e.layer, e.slots, e.directions, e.evicted) for e in twin.history
    ]
    _compare(model, opt, twin_model, twin_opt, ctl, twin, rtol=1e-3, atol=1e-4)


def test_a_batched_switch_keeps_the_output_and_chunks_change_nothing(monkeypatch):
    model, ctl, opt = _build(9)
    _train(model, opt, 10)
    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        before = model(x)
    for _ in range(2):
        ctl.switch(opt)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-6)
    # The same two switches, the groups cut into chunks of one layer.
    monkeypatch.setattr(switch, "CHUNK_ELEMENTS", 1)
    model2, ctl2, opt2 = _build(9)
    _train(model2, opt2, 10)
    assert all(g.chunk == 1 for g in ctl2._groups)
    for _ in range(2):
        ctl2.switch(opt2)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_a_group_switches_the_layers_due_and_skips_the_others():
    model, ctl, opt = _build(9)
    _train(model, opt, 5)
    name = ctl.layer_names[3]
    bad = ctl.layers[name]
    with torch.no_grad():
        bad.target.lora_B[0, 0] = float("nan")
    frozen = bad.target.weight.clone()
    with pytest.warns(Warning, match="non-finite LoRA weights"):
        events = ctl.switch(opt)
    assert {e.layer for e in events} == set(ctl.layer_names) - {name}
    assert torch.equal(bad.target.weight, frozen) and bad.pointer == bad.r
    assert all(ctl.layers[n].pointer == ctl.layers[n].r + ctl.layers[n].r_prime for n in ctl.layer_names if n != name)


def test_switch_groups_name_the_layers_that_switch_together():
    _, ctl, _ = _build(12)
    groups = ctl.switch_groups()
    assert sorted(len(g) for g in groups) == [4, 4, 4]
    assert sorted(n for g in groups for n in g) == sorted(ctl.layer_names)
    for group in groups:  # one shape per group
        assert len({tuple(ctl.layers[n].target.shape) for n in group}) == 1
