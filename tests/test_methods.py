"""The methods the absorption runs compare (srlora.experiments.methods), on a tiny Llama: each
starts from the base model's function, trains only what it should, and its trainable-state
memory is counted from the tensors."""

from __future__ import annotations

import sys

import pytest
import torch
from conftest import make_llama

from srlora.experiments.absorb import METHODS, AbsorbConfig
from srlora.experiments.methods import build, spectra, target_weights, trainable_state_bytes

# A switch every 2 steps, to switch within a few steps: srlora warns that it is short.
pytestmark = pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")


def _llama() -> torch.nn.Module:
    return make_llama().eval()


def _blocks(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(seed))


def _config(method: str) -> AbsorbConfig:
    return AbsorbConfig(method, 2, r_target=6, switch_interval=2, gamma=1.0, steps=4, batch=2, lr=1e-3)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_starts_from_the_base_function_and_trains_what_it_should(method):
    probe = _blocks(2, 9)
    base = _llama()
    with torch.no_grad():
        want = base(input_ids=probe).logits
    built = build(_config(method), base, general=_blocks(8, 1), train=_blocks(16, 2))
    with torch.no_grad():
        got = built.model(input_ids=probe).logits
    # PiSSA, CorDA and LoRA-GA move their start out of W: the output is kept to float32 rounding
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)
    trains = {n for n, p in built.model.named_parameters() if p.requires_grad}
    if method in ("full", "galore"):
        assert trains == {f"{n}.weight" for n in target_weights(built.model)}
    else:
        assert trains and all("lora_" in n for n in trains)
        assert all("lora_A" in n for n in trains) == (method == "mica")  # MiCA trains A only
    before = {n: p.detach().clone() for n, p in built.model.named_parameters()}
    built.model.train()
    for step in range(3):
        ids = _blocks(2, 20 + step)
        built.model(input_ids=ids, labels=ids).loss.backward()
        built.optimizer.step()
        built.optimizer.zero_grad()
    moved = {n for n, p in built.model.named_parameters() if not torch.equal(p, before[n])}
    if method == "srlora":  # a switch moves pairs into the frozen weight too
        assert moved >= trains
    else:
        assert moved == trains
    layers = spectra(built)
    assert len(layers) == 2 * 7 and all(v["norm"] > 0 for v in layers.values())


def test_lora_memory_is_its_factors_gradients_and_moments():
    """AdamW keeps two moments and a 0-dim step per tensor; nothing else is counted."""
    built = build(_config("lora"), _llama())
    ids = _blocks(2, 3)
    built.model(input_ids=ids, labels=ids).loss.backward()
    built.optimizer.step()
    params = [p for p in built.model.parameters() if p.requires_grad]
    numel = sum(p.numel() for p in params)
    memory = trainable_state_bytes(built)
    assert memory["params"] == memory["grads"] == 4 * numel
    assert memory["optimizer"] == 2 * 4 * numel + 4 * len(params)
    assert memory["method"] == 0
    assert memory["trainable_state_bytes"] == sum(v for k, v in memory.items() if k != "trainable_state_bytes")


def test_srlora_memory_counts_its_own_state_and_galore_its_full_gradients():
    ids = _blocks(2, 3)
    counts = {}
    for method in ("lora", "srlora", "galore", "full"):
        built = build(_config(method), _llama())
        built.model(input_ids=ids, labels=ids).loss.backward()
        built.optimizer.step()
        counts[method] = trainable_state_bytes(built)
        if method == "srlora":  # every tensor it keeps, beside the model's and the optimizer's
            assert counts[method]["method"] == built.controller.memory_bytes() > built.controller.svd_cache_bytes()
    assert counts["srlora"]["params"] == counts["lora"]["params"]
    weights = sum(w.numel() for w in target_weights(_llama()).values()) * 4
    # GaLore keeps full-size gradients and low-rank moments; full fine-tuning full-size moments
    assert counts["galore"]["grads"] == counts["full"]["grads"] == weights
    assert counts["galore"]["optimizer"] < counts["full"]["optimizer"] == 2 * weights + 4 * 14


def test_a_method_whose_package_is_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "galore_torch", None)  # import galore_torch raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'srlora\[galore\]'"):
        build(_config("galore"), _llama())


def test_a_whitened_srlora_run_takes_its_covariance_from_the_general_blocks():
    """srlora={"subspace_whiten": k}: the whitening is built from the general blocks (CorDA's
    text), k input directions a layer, the same for the same blocks and another for others;
    without them, a clear error."""
    import dataclasses

    cfg = dataclasses.replace(_config("srlora"), direction_policy="gradient_subspace", srlora={"subspace_whiten": 4})

    def whitening(general: torch.Tensor) -> dict[str, torch.Tensor]:
        ctl = build(cfg, _llama(), general=general).controller
        return {name: s["whiten_Q"] for name, s in ctl.state_dict()["directions"].items()}

    first, again, other = whitening(_blocks(8, 1)), whitening(_blocks(8, 1)), whitening(_blocks(8, 5))
    assert len(first) == 2 * 7 and all(Q.shape[1] == 4 for Q in first.values())
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert all((first[n].T @ other[n]).abs().min() < 0.99 for n in first)  # another text, other directions
    with pytest.raises(ValueError, match="needs its calibration blocks"):
        build(cfg, _llama(), general=None)


def test_bad_absorb_options_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="method must be one of"):
        AbsorbConfig("adalora")
    with pytest.raises(ValueError, match="--switch-interval"):
        AbsorbConfig("galore", 2)
    with pytest.raises(ValueError, match="galore_scale"):
        AbsorbConfig("galore", 2, switch_interval=10, galore_scale=0.0)


def test_recount_memory_counts_an_srlora_run_again_as_it_ran_and_leaves_the_rest(tmp_path):
    """A run counted by the first count (its state_dict) gets SRLoRA's part counted again: the
    controller built as the run built it, every window open; what trains, its gradients and the
    optimizer's state stand; other methods and recounted runs are left as they are."""
    import json

    from srlora.experiments.absorb import MEMORY_COUNT, recount_memory

    cfg = _config("srlora")
    old = {"params": 10, "grads": 10, "optimizer": 20, "method": 5, "trainable_state_bytes": 45}
    (tmp_path / "results.json").write_text(json.dumps({"config": cfg.to_dict(), "memory": old}))
    memory = recount_memory(tmp_path, base=_llama())
    built = build(cfg, _llama())
    built.controller.directions.update_windows(built.controller.schedule().interval)
    assert memory["method"] == built.controller.memory_bytes() > old["method"]
    assert memory["trainable_state_bytes"] == 40 + memory["method"] and memory["params"] == 10
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["memory"] == memory and saved["memory_count"] == MEMORY_COUNT
    assert recount_memory(tmp_path, base=None) == memory  # counted already: nothing is built again
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "results.json").write_text(json.dumps({"config": _config("lora").to_dict(), "memory": old}))
    assert recount_memory(lora) == old


@pytest.mark.parametrize("start", ["corda", "lora_ga"])
def test_srlora_from_a_peft_start_keeps_its_slots_and_the_base_function(start):
    """--start corda / lora_ga with first_pairs='lora': PEFT's own initialisation builds the
    slots (and moves their part out of W), SRLoRA keeps them: the output is the base's, and the
    slots are PEFT's start, not PiSSA's (an SRLoRA run with PiSSA's split has other slots)."""
    import dataclasses

    cfg = dataclasses.replace(
        _config("srlora"), direction_policy="gradient_subspace", srlora={"first_pairs": "lora"}, start=start
    )
    probe, base = _blocks(2, 9), _llama()
    with torch.no_grad():
        want = base(input_ids=probe).logits
    built = build(cfg, base, general=_blocks(8, 1), train=_blocks(16, 2))
    with torch.no_grad():
        torch.testing.assert_close(built.model(input_ids=probe).logits, want, rtol=0, atol=1e-4)
    peft_start = build(dataclasses.replace(cfg, method=start, start=None), _llama(), _blocks(8, 1), _blocks(16, 2))
    assert len(peft_start.init) == len(built.controller.layers) == 2 * 7
    for name, (B0, A0) in peft_start.init.items():
        layer = built.controller.layers[name]
        assert torch.equal(layer.target.lora_B, B0) and torch.equal(layer.target.lora_A, A0), name
    with pytest.raises(ValueError, match="--first-pairs lora"):
        AbsorbConfig("srlora", 2, start=start)
    with pytest.raises(ValueError, match="--method srlora"):
        AbsorbConfig("lora", 2, start=start, srlora={"first_pairs": "lora"})
