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
