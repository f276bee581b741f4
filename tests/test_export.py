"""Export: merged plain model, and a standard PEFT LoRA adapter relative to W0."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from conftest import CASES, adam, build, logits, make_base, train

from srlora.targets import find_lora_targets


def _trained(case_name, steps=60):
    model, ctl = build(case_name, r=4, r_target=16, gamma=0.5, total_steps=steps)
    opt = adam(model, lr=2e-2)
    ctl.attach(opt)
    train(model, case_name, opt, steps=steps)
    assert ctl.history, "the test needs switches to have happened"
    return model, ctl


def test_merge_and_unload(case_name):
    model, ctl = _trained(case_name)
    expected = logits(case_name, model)
    merged = ctl.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert type(merged) is type(make_base(CASES[case_name]))
    torch.testing.assert_close(logits(case_name, merged), expected, atol=1e-5, rtol=1e-5)


def test_exported_lora_loads_on_the_original_model(case_name, tmp_path):
    model, ctl = _trained(case_name)
    expected = logits(case_name, model)
    errors = ctl.export_lora(tmp_path / "adapter")
    assert all(e < 1e-5 for e in errors.values())
    saved = json.loads((tmp_path / "adapter" / "reconstruction_error.json").read_text())
    assert saved["relative_frobenius_error"] == errors
    # Rank at most 2p per layer (SPEC section 6).
    used = {name.split("base_model.model.", 1)[-1]: p for name, p in ctl.directions_used().items()}
    assert all(saved["ranks"][k] <= 2 * used[k] for k in used)
    original = make_base(CASES[case_name])  # the untouched pretrained weights
    loaded = peft.PeftModel.from_pretrained(original, tmp_path / "adapter")
    # Float32 rounding of the factors and of the W0 reconstruction: 1e-4 on logits of O(1).
    torch.testing.assert_close(logits(case_name, loaded), expected, atol=1e-4, rtol=1e-4)


def test_truncated_export_reports_its_error(tmp_path):
    model, ctl = _trained("mlp")
    exact_logits = logits("mlp", model)
    errors = ctl.export_lora(tmp_path / "r2", rank=2)
    assert all(0 < e < 1 for e in errors.values())
    loaded = peft.PeftModel.from_pretrained(make_base(CASES["mlp"]), tmp_path / "r2")
    for t in find_lora_targets(loaded, "default"):
        assert t.lora_A.shape[0] == 2
    # A rank-2 cut of a rank-up-to-24 update changes the function.
    assert not torch.allclose(logits("mlp", loaded), exact_logits, atol=1e-4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        ctl.export_lora(tmp_path / "bad", rank=0)


def test_export_replaces_atomically(tmp_path):
    _, ctl = _trained("mlp")
    target = tmp_path / "adapter"
    ctl.export_lora(target)
    first = (target / "adapter_model.safetensors").read_bytes()
    ctl.export_lora(target, rank=3)
    assert (target / "adapter_model.safetensors").read_bytes() != first
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def _pair_runs(case_name, steps=60):
    """The same run with and without the record of fused pairs."""
    runs = []
    for keep in (True, False):
        model, ctl = build(case_name, r=4, r_target=16, gamma=0.5, total_steps=steps, fused_records=keep)
        opt = adam(model, lr=2e-2)
        ctl.attach(opt)
        train(model, case_name, opt, steps=steps)
        runs.append((model, ctl))
    return runs


def test_fused_records_off_trains_the_same_run(case_name):
    """The records are bookkeeping only (W holds every fused pair): dropping them changes no
    weight, no switch and no output, and drops their memory."""
    (kept, ctl_kept), (dropped, ctl_dropped) = _pair_runs(case_name)
    assert ctl_kept.history and ctl_kept.history == ctl_dropped.history
    for (name, a), (_, b) in zip(kept.state_dict().items(), dropped.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    state = ctl_dropped.state_dict()
    layer_state = next(iter(state["layers"].values()))
    assert not any(k.startswith(("fused_", "entered_")) for k in layer_state)
    assert any(k.startswith("fused_") for k in next(iter(ctl_kept.state_dict()["layers"].values())))


def test_export_without_records_takes_the_base(case_name, tmp_path):
    (_, ctl_kept), (dropped, ctl) = _pair_runs(case_name)
    expected = logits(case_name, dropped)
    with pytest.raises(ValueError, match="base="):
        ctl.export_lora(tmp_path / "no-base")
    assert not (tmp_path / "no-base").exists()
    errors = ctl.export_lora(tmp_path / "adapter", base=make_base(CASES[case_name]))
    assert all(e < 1e-5 for e in errors.values())
    saved = json.loads((tmp_path / "adapter" / "reconstruction_error.json").read_text())
    used = {name.split("base_model.model.", 1)[-1]: p for name, p in ctl.directions_used().items()}
    assert all(saved["ranks"][k] <= 2 * used[k] for k in used)
    loaded = peft.PeftModel.from_pretrained(make_base(CASES[case_name]), tmp_path / "adapter")
    # As the records' export: float32 rounding of the factors and of the difference.
    torch.testing.assert_close(logits(case_name, loaded), expected, atol=1e-4, rtol=1e-4)
    # The difference's factors and the records' give the same update (the run is the same run);
    # 1e-5 of the update's scale: float32 rounding of W_t against the records' exact sum.
    base = make_base(CASES[case_name])
    from srlora.export import base_weight

    for name, layer in ctl.layers.items():
        P, Q = layer.total_update_factors(base_weight(base, name))
        P0, Q0 = ctl_kept.layers[name].total_update_factors()
        exact = P0 @ Q0
        torch.testing.assert_close(P @ Q, exact, atol=1e-5 * float(exact.abs().max()), rtol=0)


def test_export_without_records_refuses_another_base(tmp_path):
    _, (_, ctl) = _pair_runs("mlp", steps=40)
    other = make_base(CASES["mlp"], seed=1)
    with pytest.raises(ValueError, match="not the pretrained weight"):
        ctl.export_lora(tmp_path / "adapter", base=other)
    with pytest.raises(KeyError, match="no module"):
        ctl.export_lora(tmp_path / "adapter", base=torch.nn.Linear(2, 2))
    assert not (tmp_path / "adapter").exists()


@pytest.mark.parametrize("shape", [(48, 40), (600, 900)])
def test_the_difference_is_factored_at_its_rank_on_small_and_large_layers(shape):
    """A rank-6 update plus float32-sized rounding: its factors hold the update to that rounding,
    through the full SVD (small layer) and through the range finder (a layer wide against 2p)."""
    from srlora.svd import factor_difference

    g = torch.Generator().manual_seed(0)
    m, n = shape
    update = torch.randn(m, 6, generator=g, dtype=torch.float64) @ torch.randn(6, n, generator=g, dtype=torch.float64)
    noise = 1e-7 * float(update.abs().max()) * torch.randn(m, n, generator=g, dtype=torch.float64)
    P, Q = factor_difference(update + noise, max_rank=8)
    assert P.shape == (m, 6) and Q.shape == (6, n)  # the numerical rank, not max_rank
    err = float((P.double() @ Q.double() - update).norm() / update.norm())
    assert err < 1e-6, err  # float32 factors of a float64 update, and the noise
