"""bf16 autocast training works, and switches keep their float32 exactness under it."""

from __future__ import annotations

import torch
from conftest import CASES, adam, build


def test_bf16_autocast_training_with_switches():
    model, ctl = build("bert", r=4, r_target=16, gamma=0.5, total_steps=120)
    opt = adam(model, lr=5e-3)
    ctl.attach(opt)
    case = CASES["bert"]
    g = torch.Generator().manual_seed(0)
    losses = []
    model.train()
    for _ in range(120):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = case.loss(model, case.batch(g))
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert sorted({e.step for e in ctl.history}) == [20, 40, 60, 80, 100]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert ctl.skipped_steps == 0
    # Weights and SRLoRA state stay float32 under autocast.
    assert all(layer.target.weight.dtype == torch.float32 for layer in ctl.layers.values())
    # The switch itself is float32 math on float32 weights: under autocast the logits of
    # the same batch move only by bf16 compute noise, which is the same before and after
    # (the fp32 logits move by <= 1e-5, as without autocast).
    batch = case.batch(torch.Generator().manual_seed(9))
    model.eval()
    with torch.no_grad():
        fp32_before = case.logits(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_before = case.logits(model, batch).float()
        ctl.switch(opt)
        fp32_after = case.logits(model, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_after = case.logits(model, batch).float()
    torch.testing.assert_close(fp32_after, fp32_before, atol=1e-5, rtol=0)
    # bf16 matmuls round to 2^-8 relative; W and s*B*A are rounded separately, so moving
    # a term between them changes the bf16 logits by a few such roundings at most.
    torch.testing.assert_close(bf16_after, bf16_before, atol=5e-2, rtol=5e-2)
