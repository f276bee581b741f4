"""SRLoRA's memory, counted from its tensors: every buffer it keeps (records as allocated, the
sketches' per-step sums and an open window's test matrices included), none of the model's."""

from __future__ import annotations

import pytest
import torch
from conftest import build


def _nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("records", [True, False])
def test_memory_bytes_counts_every_buffer_srlora_keeps_and_nothing_of_the_model(records):
    model, ctl = build(
        "mlp",
        r=2,
        r_target=12,
        gamma=1.0,
        switch_interval=20,
        direction_policy="gradient_subspace",
        fused_records=records,
    )
    layers = list(ctl.layers.values())
    own = 0
    for layer in layers:
        cache = layer.cache
        own += _nbytes(cache.U, cache.S, cache.V, *layer.importance.tensors())
        for rec in (layer.record, layer.entered):
            if rec is not None:
                own += _nbytes(*rec.storage())  # allocated up front, for every pair the layer may use
    own += 8 * len(layers)  # each switch group's s and entry value per layer (float32)
    probes = list(ctl.directions.probes.values())
    sketches = sum(_nbytes(p.Yt, p.Z) for p in probes)
    assert ctl.memory_bytes() == own + 2 * sketches  # the window's sums and the step's
    assert (layers[0].record is not None) == records
    ctl.directions.update_windows(5)  # inside every layer's first window: the test matrices too
    assert all(p.armed for p in probes)
    assert ctl.memory_bytes() == own + 3 * sketches  # Omega^T (k, n) and Psi (l, m): Y's and Z's sizes
    before = ctl.memory_bytes()
    model.register_buffer("extra", torch.zeros(1000))  # the model's own tensors are not SRLoRA's
    assert ctl.memory_bytes() == before


def test_memory_bytes_walks_only_srlora_s_own_objects():
    """An optimizer wrapper that is no torch optimizer (as a framework's) holds the world: it
    is not walked, nor is a cycle of objects a reason to recurse for ever."""
    _, ctl = build("mlp", r=2, r_target=12, gamma=1.0, switch_interval=20)
    before = ctl.memory_bytes()

    class Wrapper:  # not a torch.optim.Optimizer, holds tensors and itself
        def __init__(self) -> None:
            self.big = torch.zeros(10_000)
            self.me = self

    wrapper = Wrapper()
    ctl.optimizer_reset.optimizer = wrapper  # where attach keeps the optimizer it is given
    assert ctl.memory_bytes() == before


def test_memory_bytes_counts_the_whitening_of_each_layer():
    """subspace_whiten=k keeps Q (n, k) and its gains (k,) in float32 a layer, nothing else:
    the same controller without it counts exactly that much less."""
    kw = dict(r=2, r_target=12, gamma=1.0, switch_interval=20, direction_policy="gradient_subspace")
    _, plain = build("bert", **kw)
    _, whitened = build("bert", subspace_whiten=4, **kw)
    extra = sum(4 * (layer.target.shape[1] * 4 + 4) for layer in whitened.layers.values())
    assert whitened.memory_bytes() - plain.memory_bytes() == extra
