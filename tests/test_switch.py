"""The switch: function preserved, the right pairs recycled, the pointer and history right."""

from __future__ import annotations

import pytest
import torch
from conftest import CASES, MLP, adam, build, logits, train

from srlora import SRLoRA, SRLoRAConfig, SRLoRAWarning
from srlora.targets import find_lora_targets


def test_output_unchanged_by_every_switch(case_name):
    """Each switch only moves terms between W and sBA: switching every layer until it
    runs out of directions keeps the logits within 1e-5 (fp32) after each switch, with an
    adapter trained away from its PiSSA start."""
    # r=2, gamma=0.5: one direction per switch; tiny BERT/GPT-2 (d=32) fit 30 switches.
    with pytest.warns(SRLoRAWarning, match="clamped"):
        model, ctl = build(case_name, r=2, r_target=200, gamma=0.5, switch_interval=1000)
    opt = adam(model)
    train(model, case_name, opt, steps=5, ctl=ctl)
    ref = logits(case_name, model)
    switched = 0
    with pytest.warns(SRLoRAWarning, match="stops switching"):
        while ctl.switch(opt):
            switched += 1
            torch.testing.assert_close(logits(case_name, model), ref, atol=1e-5, rtol=0)
    assert switched == min(ctl.directions_used().values()) - 2 >= 30


def test_output_unchanged_by_100_consecutive_switches():
    """100 switches in a row on a trained MLP: logits within 1e-5 after each one."""
    import peft

    torch.manual_seed(0)
    base = MLP(d_in=128, d_hidden=160).eval()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2"]))
    ctl = SRLoRA(model, SRLoRAConfig(r_target=128, gamma=0.25, switch_interval=1000))
    opt = adam(model)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        loss = model(torch.randn(8, 128, generator=g)).square().mean()
        loss.backward()
        ctl.update_importance()
        opt.step()
        ctl.step(opt)
        opt.zero_grad()
    x = torch.randn(16, 128, generator=g)
    with torch.no_grad():
        ref = model(x)
        for k in range(100):
            assert len(ctl.switch(opt)) == 2
            torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=0, msg=lambda m, k=k: f"switch {k}: {m}")
    assert set(ctl.directions_used().values()) == {104}


def test_lowest_scoring_pairs_are_recycled():
    model, ctl = build("mlp", r=8, r_target=32, gamma=0.25, switch_interval=1000)
    opt = adam(model)
    train(model, "mlp", opt, steps=10, ctl=ctl)
    scores = ctl.pair_scores()
    slots_before = ctl.slot_directions()
    events = ctl.switch(opt)
    assert len(events) == 2
    for ev in events:
        s = scores[ev.layer]
        expected = torch.sort(torch.argsort(s)[:2]).values.tolist()
        assert list(ev.slots) == expected
        assert max(s[list(ev.slots)]) <= min(s[[k for k in range(8) if k not in ev.slots]])
        assert list(ev.directions) == [8, 9]
        assert list(ev.evicted) == [slots_before[ev.layer][k] for k in ev.slots]
        torch.testing.assert_close(torch.tensor(ev.scores), s[list(ev.slots)])
        # Recycled pairs restart with zero scores, the others keep theirs.
        after = ctl.pair_scores()[ev.layer]
        assert torch.all(after[list(ev.slots)] == 0)
        keep = [k for k in range(8) if k not in ev.slots]
        assert torch.equal(after[keep], s[keep])


def test_ties_break_to_lowest_index():
    # Before any step all scores are zero: a tie everywhere.
    _, ctl = build("mlp", r=4, r_target=16, gamma=0.5)
    events = ctl.switch()
    assert all(ev.slots == (0, 1) for ev in events)
    events = ctl.switch()
    assert all(ev.slots == (0, 1) and ev.directions == (6, 7) and ev.evicted == (4, 5) for ev in events)


def test_reset_all_scores_option():
    model, ctl = build("mlp", r=4, r_target=16, gamma=0.5, reset_scores="all")
    train(model, "mlp", adam(model), steps=5, ctl=ctl)
    assert all(bool((s > 0).all()) for s in ctl.pair_scores().values())
    ctl.switch()
    assert all(bool((s == 0).all()) for s in ctl.pair_scores().values())


def test_reinitialised_pairs_are_the_next_singular_directions():
    """After a switch, s * B[:, k] A[k] of a recycled slot is the rank-1 term
    U[:, j] S[j] V[:, j]^T of W0's direction j = p."""
    case = CASES["mlp"]
    model, ctl = build("mlp", r=4, r_target=16, gamma=0.5)
    train(model, "mlp", adam(model), steps=3, ctl=ctl)
    (ev, *_) = ctl.switch()
    t = next(t for t in find_lora_targets(model, "default") if t.name == ev.layer)
    from conftest import make_base

    w0 = dict(make_base(case).named_modules())[ev.layer.replace("base_model.model.", "")].weight.detach()
    U, S, Vh = torch.linalg.svd(w0)
    for slot, j in zip(ev.slots, ev.directions, strict=True):
        term = t.scaling * torch.outer(t.lora_B[:, slot], t.lora_A[slot])
        torch.testing.assert_close(term, S[j] * torch.outer(U[:, j], Vh[j]), atol=1e-5, rtol=1e-4)


def test_pointer_advances_by_r_prime_and_exhaustion():
    model, ctl = build("mlp", r=4, r_target=12, gamma=0.5)
    opt = adam(model)
    for k in range(1, 5):
        ctl.switch(opt)
        assert set(ctl.directions_used().values()) == {4 + 2 * k}
    assert len(ctl.history) == 4 * 2
    with pytest.warns(SRLoRAWarning, match="stops switching") as record:
        assert ctl.switch(opt) == []
        assert ctl.switch(opt) == []
    # Said once per layer, not once per attempt.
    assert len([w for w in record if "stops switching" in str(w.message)]) == 2
    assert set(ctl.directions_used().values()) == {12}


def test_r_target_clamped_per_layer_with_one_warning():
    with pytest.warns(SRLoRAWarning, match="clamped") as record:
        _, ctl = build("bert", r=4, r_target=48, gamma=0.5)
    assert len([w for w in record if "clamped" in str(w.message)]) == 1
    limits = {name: layer.limit for name, layer in ctl.layers.items()}
    assert set(limits.values()) == {32}  # every BERT layer has min(m, n) = 32


def test_switches_follow_the_schedule_in_training():
    model, ctl = build("mlp", r=4, r_target=16, gamma=0.5, switch_interval=None, total_steps=120)
    # N_switch = (16 - 4) / 2 = 6, t_interval = 120 // 6 = 20, no switch at step 120.
    assert ctl.schedule().steps() == [20, 40, 60, 80, 100]
    opt = adam(model)
    ctl.attach(opt)
    train(model, "mlp", opt, steps=120)
    assert sorted({ev.step for ev in ctl.history}) == [20, 40, 60, 80, 100]
    assert ctl.global_step == 120
    assert set(ctl.directions_used().values()) == {14}


def test_only_chosen_adapter_is_touched():
    import peft

    case = CASES["mlp"]
    from conftest import make_base

    base = make_base(case)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets))
    model.add_adapter("other", peft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets))
    other = {n: p.detach().clone() for n, p in model.named_parameters() if ".other." in n}
    assert other
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    ctl.switch()
    for n, p in model.named_parameters():
        if ".other." in n:
            assert torch.equal(p, other[n]), n
    model.set_adapter("other")
    with pytest.raises(ValueError, match="No LoRA layer carries adapter 'third'"):
        SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20, adapter_name="third"))


def test_bf16_switch_drift_is_bounded():
    """bf16 base weights: switch math in float32, one rounding per switch."""
    import peft
    from conftest import make_base

    case = CASES["mlp"]
    base = make_base(case).to(torch.bfloat16)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets))
    ctl = SRLoRA(model, SRLoRAConfig(r_target=40, gamma=0.5, switch_interval=20))
    x = case.batch(torch.Generator().manual_seed(0))["x"].to(torch.bfloat16)
    with torch.no_grad():
        ref = model(x).float()
        for _ in range(10):
            ctl.switch()
        out = model(x).float()
    # Each switch rounds W once to bf16 (relative 2^-9); ten switches drift by at most
    # ~10 such roundings of the logits' scale.
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)
    assert all(layer.target.weight.dtype == torch.bfloat16 for layer in ctl.layers.values())


def test_per_layer_rank_pattern():
    """PEFT's rank_pattern: each layer recycles gamma * its own r, on its own schedule."""
    model, ctl = build(
        "mlp",
        r=4,
        r_target=24,
        gamma=0.5,
        switch_interval=None,
        total_steps=200,
        lora_kwargs={"rank_pattern": {"fc2": 8}},
    )
    names = {n.rsplit(".", 1)[-1]: n for n in ctl.layer_names}
    # fc1: r=4, r'=2, N_switch=10, t=20; fc2: r=8, r'=4, N_switch=4, t=50.
    assert ctl.schedule(names["fc1"]).steps() == list(range(20, 200, 20))
    assert ctl.schedule(names["fc2"]).steps() == [50, 100, 150]
    opt = adam(model)
    ctl.attach(opt)
    train(model, "mlp", opt, steps=200)
    assert ctl.directions_used() == {names["fc1"]: 4 + 9 * 2, names["fc2"]: 8 + 3 * 4}


def test_adaptive_switching_in_training():
    """adaptive_switch: switches come when rankings settle, never sooner than the EMA
    warm-up after the previous one, within the r_target budget and before the last step."""
    model, ctl = build(
        "mlp",
        r=4,
        r_target=16,
        gamma=0.5,
        switch_interval=None,
        total_steps=300,
        adaptive_switch=True,
        adaptive_patience=5,
    )
    opt = adam(model)
    ctl.attach(opt)
    train(model, "mlp", opt, steps=300)
    for name in ctl.layer_names:
        steps = [e.step for e in ctl.history if e.layer == name]
        assert 1 <= len(steps) <= 6  # N_switch = (16 - 4) / 2
        gaps = [b - a for a, b in zip([0, *steps], steps, strict=False)]
        assert min(gaps) >= 19 and max(gaps) <= 2 * 50  # warm-up .. twice t_interval (300 // 6)
        assert max(steps) < 300
    # Not the fixed schedule: at least one switch off the multiples of 50.
    assert any(e.step % 50 for e in ctl.history)
    state = ctl.state_dict()
    assert all(layer["trigger"] is not None for layer in state["layers"].values())
