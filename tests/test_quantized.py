"""SRLoRA on a bitsandbytes 4-bit (and 8-bit) base: the quantized weight is never written;
what SRLoRA would add to it lives in low-rank side factors applied in the forward."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import peft
import pytest
import torch

bnb = pytest.importorskip("bitsandbytes")  # an optional extra; CI installs it

from conftest import make_llama  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaForCausalLM  # noqa: E402

from srlora import SRLoRA, SRLoRAConfig, load_checkpoint, save_checkpoint  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_llama(hidden_size=64, intermediate_size=128, vocab_size=100).save_pretrained(folder)
    return folder


def _load(folder: Path, bits: int = 4) -> torch.nn.Module:
    if bits == 4:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = AutoModelForCausalLM.from_pretrained(
            folder, quantization_config=q, device_map="cpu", dtype=torch.float32
        )
    torch.manual_seed(1)
    return peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0))


def _batch(seed: int) -> dict:
    ids = torch.randint(0, 100, (4, 12), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _logits(model) -> torch.Tensor:
    # Train mode under no_grad: this Llama has no dropout (lora_dropout=0 too), so it computes
    # the eval function, and bitsandbytes keeps its float32 path. An eval-mode forward would
    # repack the 4-bit weights for its bfloat16 CPU inference kernel on AVX512-BF16 CPUs
    # (see test_init_keeps_the_gradient_through_the_4bit_base).
    model.train()
    with torch.no_grad():
        return model(input_ids=_batch(99)["input_ids"]).logits


def _quantized_bytes(model) -> dict[str, torch.Tensor]:
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            out[name] = module.weight.data.clone()
            out[name + ".absmax"] = module.weight.quant_state.absmax.clone()
        elif isinstance(module, bnb.nn.Linear8bitLt):
            out[name] = module.weight.data.clone()
    return out


def _train(model, opt, start: int, stop: int) -> None:
    model.train()
    for step in range(start, stop):
        model(**_batch(step)).loss.backward()
        opt.step()
        opt.zero_grad()


def _layer_outputs(ctl) -> dict[str, torch.Tensor]:
    """Each adapted layer's output on a fixed input (its own width)."""
    out = {}
    with torch.no_grad():
        for name, layer in ctl.layers.items():
            x = torch.randn(6, layer.target.shape[1], generator=torch.Generator().manual_seed(7))
            out[name] = layer.target.module(x)
    return out


# bitsandbytes' 4-bit matmul on the CPU rounds its input to bfloat16. SRLoRA changes a layer's
# output by float32 rounding (checked per layer to 1e-5 below); through the next layers that
# can flip a bfloat16 rounding of their input (2^-9 relative), hence 5e-3 on the logits.
LOGITS_TOL = dict(rtol=5e-3, atol=5e-3)


# A switch moves the fused pairs into the side factors, stored in side_factor_dtype: in
# float32 the layer's output changes by float32 rounding (1e-5 here); in bfloat16 by the
# rounding of those pairs, at most 2^-8 relative per factor entry, so below 2^-7 of their
# contribution to the output (with float32 rounding on top).
SWITCH_TOL = {"float32": 0.0, "bfloat16": 2.0**-7}
# Through the two blocks those per-layer changes reach the logits (~1 here) at up to ~1e-2
# in bfloat16; in float32 only bitsandbytes' own bfloat16 input rounding remains.
SWITCH_LOGITS_TOL = {"float32": LOGITS_TOL, "bfloat16": dict(rtol=2e-2, atol=2e-2)}


@pytest.mark.parametrize("side", ["bfloat16", "float32"])
def test_init_and_switches_keep_the_output_and_never_write_the_4bit_weight(tiny_llama, side):
    model = _load(tiny_llama)
    before, bytes_before = _logits(model), _quantized_bytes(model)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20, side_factor_dtype=side))
    assert all(layer.target.kind == "bnb" for layer in ctl.layers.values()) and len(ctl.layers) == 14
    torch.testing.assert_close(_logits(model), before, **LOGITS_TOL)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    _train(model, opt, 0, 45)  # switches after steps 20 and 40
    assert {e.step for e in ctl.history} == {20, 40}
    for _ in range(3):
        trained, layers_before = _logits(model), _layer_outputs(ctl)
        assert ctl.switch()
        for name, out in _layer_outputs(ctl).items():  # the invariant itself, per layer
            layer = ctl.layers[name]
            x = torch.randn(6, layer.target.shape[1], generator=torch.Generator().manual_seed(7))
            k = layer.r_prime
            fused = layer.target.scaling * (x @ layer.fused_A[-k:].float().T) @ layer.fused_B[:, -k:].float().T
            tol = SWITCH_TOL[side] * float(fused.abs().max()) + 1e-5
            torch.testing.assert_close(out, layers_before[name], rtol=0, atol=tol)
        torch.testing.assert_close(_logits(model), trained, **SWITCH_LOGITS_TOL[side])
    after = _quantized_bytes(model)
    assert after.keys() == bytes_before.keys() and all(torch.equal(after[k], v) for k, v in bytes_before.items())
    # The side factors grow with the directions used (p = 4 + 5 switches x 2), in the side
    # dtype: (m + n) (2p - r) numbers per layer, the p pairs that entered and the p - r fused.
    layer = ctl.layers[ctl.layer_names[0]]
    m, n = layer.target.shape
    size = torch.tensor([], dtype=getattr(torch, side)).element_size()
    assert layer.pointer == 14 and layer.side_factor_bytes == (m + n) * (2 * 14 - 4) * size


def test_side_factors_grow_with_the_directions_used_and_the_cache_waits_on_the_cpu(tiny_llama):
    model = _load(tiny_llama)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    layer = ctl.layers[ctl.layer_names[0]]
    m, n = layer.target.shape
    assert layer.cache.U.device.type == "cpu"
    assert layer.side_factor_bytes == (m + n) * 4 * 2  # the r = 4 pairs that entered, bfloat16
    ctl.switch()
    assert layer.side_factor_bytes == (m + n) * (4 + 2 + 2) * 2  # + r' = 2 entered and 2 fused
    # The records hold exactly what entered: the slots' values are representable in bfloat16.
    E_B, E_A = layer.target.entered.factors()
    torch.testing.assert_close(E_B[:, -2:], layer.target.lora_B[:, list(ctl.history[-1].slots)], rtol=0, atol=0)
    torch.testing.assert_close(E_A[-2:], layer.target.lora_A[list(ctl.history[-1].slots)], rtol=0, atol=0)


def test_resume_of_a_quantized_run_is_exact(tiny_llama, tmp_path):
    def build():
        model = _load(tiny_llama)
        ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ctl.attach(opt)
        return model, ctl, opt

    model, ctl, opt = build()
    _train(model, opt, 0, 30)
    save_checkpoint(tmp_path / "q.ckpt", model, ctl, opt)
    _train(model, opt, 30, 50)
    model2, ctl2, opt2 = build()
    assert load_checkpoint(tmp_path / "q.ckpt", model2, ctl2, opt2) == 30
    _train(model2, opt2, 30, 50)
    assert ctl2.history == ctl.history
    torch.testing.assert_close(_logits(model2), _logits(model), rtol=0, atol=0)
    for name, layer in ctl.layers.items():
        twin = ctl2.layers[name]
        assert torch.equal(layer.target.entered.B, twin.target.entered.B) and torch.equal(layer.fused_A, twin.fused_A)


def test_export_reloads_on_the_dequantized_base_and_merge_matches(tiny_llama, tmp_path):
    model = _load(tiny_llama)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    _train(model, opt, 0, 45)
    trained = _logits(model)
    errors = ctl.export_lora(tmp_path / "adapter")
    assert max(errors.values()) < 1e-6
    # The dequantized base: the float model with each quantized weight replaced by what the
    # 4-bit layer applies.
    base = LlamaForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    for name, layer in ctl.layers.items():
        key = name.removeprefix("base_model.model.")
        base.get_submodule(key).weight.data.copy_(layer.target.dequantized())
    reloaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter")
    merged = ctl.merge_and_unload()
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in merged.modules())
    # In float32 the exported adapter on the dequantized base computes what the merged model
    # (dequantized weight + side factors + s B A) computes.
    torch.testing.assert_close(_logits(reloaded), _logits(merged), rtol=1e-4, atol=1e-4)
    # ... and what the trained 4-bit model computes: the same float32 function, evaluated as
    # dequant(W_q) x + side factors + s B A x instead of one merged matmul.
    torch.testing.assert_close(_logits(merged), trained, rtol=1e-4, atol=1e-4)


def test_8bit_base_is_never_written(tiny_llama):
    model = _load(tiny_llama, bits=8)
    bytes_before = _quantized_bytes(model)
    before = _logits(model)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    # bitsandbytes' int8 matmul on the CPU casts its inputs to float16, so the logits move by
    # float16 rounding of the layers' inputs, not by SRLoRA: 1e-2 absolute on logits ~ 1.
    torch.testing.assert_close(_logits(model), before, rtol=1e-2, atol=1e-2)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    _train(model, opt, 0, 25)
    trained = _logits(model)
    assert ctl.switch()
    torch.testing.assert_close(_logits(model), trained, rtol=1e-2, atol=1e-2)
    after = _quantized_bytes(model)
    assert bytes_before and all(torch.equal(after[k], v) for k, v in bytes_before.items())


def test_init_keeps_the_gradient_through_the_4bit_base(tiny_llama):
    """The init leaves the model's function unchanged, so it leaves the loss's gradient with
    respect to the input unchanged too. Reading a 4-bit weight must not move bitsandbytes to
    its CPU inference kernel: on a CPU with AVX512-BF16, a no-grad forward of a Linear4bit in
    eval mode repacks the weight for ``gemv_4bit``, which has no backward, and every later
    training step then drops the gradient through the base weight."""
    model = _load(tiny_llama)
    model.eval()  # the case at risk (from_pretrained leaves the base model's layers in eval mode)
    batch = _batch(0)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach()

    def input_grad() -> torch.Tensor:
        x = embeds.clone().requires_grad_(True)
        model(inputs_embeds=x, labels=batch["labels"]).loss.backward()
        model.zero_grad()
        return x.grad

    before = input_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        SRLoRA(model, SRLoRAConfig(r_target=16, total_steps=100))
    # float32 throughout; the side factors reorder the sums: relative error ~1e-6.
    torch.testing.assert_close(input_grad(), before, rtol=1e-4, atol=1e-6)


class _Hand(torch.nn.Module):
    """A model whose layers are bitsandbytes 4-bit modules placed by hand, not loaded through
    transformers' BitsAndBytesConfig: PEFT wraps them in its plain lora.Linear."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = _linear4bit(torch.nn.Linear(24, 48))
        self.fc2 = _linear4bit(torch.nn.Linear(48, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _linear4bit(dense: torch.nn.Linear) -> torch.nn.Module:
    q = bnb.nn.Linear4bit(dense.in_features, dense.out_features, compute_dtype=torch.float32, quant_type="nf4")
    q.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    q.bias = torch.nn.Parameter(dense.bias.data.clone())
    return q.to("cpu")  # quantizes


def test_a_4bit_model_built_by_hand_trains_switches_and_exports(tmp_path):
    hand = _Hand()
    assert hand.fc1.weight.dtype == torch.uint8  # really packed 4-bit
    model = peft.get_peft_model(hand, peft.LoraConfig(r=4, lora_alpha=4, target_modules=["fc1", "fc2"]))
    assert type(model.base_model.model.fc1).__name__ == "Linear"  # PEFT's plain lora.Linear over Linear4bit
    packed = {k: v.clone() for k, v in model.state_dict().items() if v.dtype == torch.uint8}
    x = torch.randn(32, 24, generator=torch.Generator().manual_seed(1))
    y = torch.randn(32, 16, generator=torch.Generator().manual_seed(2))
    model.train()
    with torch.no_grad():
        before = model(x)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=12, switch_interval=20, side_factor_dtype="float32"))
    assert [layer.target.kind for layer in ctl.layers.values()] == ["bnb", "bnb"]
    with torch.no_grad():  # float32 side factors: the init keeps the output to float32 rounding
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    losses = []
    for _ in range(65):  # switches after steps 20, 40, 60
        loss = (model(x) - y).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0] and len(ctl.history) == 2 * 3
    with torch.no_grad():
        trained = model(x)
        ctl.switch()
        torch.testing.assert_close(model(x), trained, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in packed.items())
    ctl.export_lora(tmp_path / "adapter")
    # The exported adapter on the dequantized base computes what the trained 4-bit model does.
    plain = torch.nn.Module()
    plain.fc1 = torch.nn.Linear(24, 48)
    plain.fc2 = torch.nn.Linear(48, 16)
    plain.forward = _Hand.forward.__get__(plain)  # type: ignore[method-assign]
    for name, layer in ctl.layers.items():
        key = name.removeprefix("base_model.model.")
        plain.get_submodule(key).weight.data.copy_(layer.target.dequantized())
        plain.get_submodule(key).bias.data.copy_(layer.target.bias.data)
    reloaded = peft.PeftModel.from_pretrained(plain, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x), model(x), rtol=1e-4, atol=1e-4)
    # ... and so does its gradient with respect to the input (the side factors' own backward).
    xq, xp = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    model(xq).square().sum().backward()
    reloaded(xp).square().sum().backward()
    torch.testing.assert_close(xq.grad, xp.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "option",
    [{}, {"subspace_exclude": 6}, {"first_pairs": "lora"}, {"subspace_whiten": 4}],
    ids=["", "exclude", "lora", "whitened"],
)
def test_gradient_subspace_entries_on_a_4bit_base_keep_the_output_and_resume_exactly(tiny_llama, tmp_path, option):
    """Issue 24's entries on the quantized kind: new pairs along the windowed gradient's subspace
    at half the first pairs' scale. Each switch changes a layer's output by float32 rounding
    only (float32 side factors), the 4-bit weight is never written, and a run checkpointed
    inside a capture window resumes bit-exactly."""
    config = SRLoRAConfig(
        r_target=16,
        switch_interval=20,
        side_factor_dtype="float32",
        direction_policy="gradient_subspace",
        entry_scale=0.5,
        **option,  # W0's top 6 directions left alone, LoRA's first pairs, or whitened
    )

    def build():
        model = _load(tiny_llama)

        def general_text() -> None:  # the input covariance of a batch no step trains on
            model.train()  # the float32 path (see _logits)
            model(input_ids=_batch(77)["input_ids"])

        ctl = SRLoRA(model, config, run_model=general_text if config.subspace_whiten else None)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        ctl.attach(opt)
        return model, ctl, opt

    model, ctl, opt = build()
    bytes_before = _quantized_bytes(model)
    _train(model, opt, 0, 30)  # a switch after step 20 from the sketch of steps 2-20; step 30 is in the next window
    save_checkpoint(tmp_path / "q.ckpt", model, ctl, opt)
    _train(model, opt, 30, 50)
    assert {e.step for e in ctl.history} == {20, 40}
    layers_before = _layer_outputs(ctl)
    ctl.switch()
    for name, out in _layer_outputs(ctl).items():
        torch.testing.assert_close(out, layers_before[name], rtol=0, atol=1e-5)
    after = _quantized_bytes(model)
    assert all(torch.equal(after[k], v) for k, v in bytes_before.items())
    layer = ctl.layers[ctl.layer_names[0]]
    assert layer.cache.rank == max(4, config.subspace_exclude)  # the first pairs and the directions left alone
    entered = next(e for e in reversed(ctl.history) if e.layer == layer.name).slots[0]  # this layer's last switch
    sigma = layer.target.scaling * layer.target.lora_B[:, entered].norm() * layer.target.lora_A[entered].norm()
    torch.testing.assert_close(float(sigma), 0.5 * float(layer.cache.S[:4].mean()), rtol=1e-5, atol=0)

    model2, ctl2, opt2 = build()
    assert load_checkpoint(tmp_path / "q.ckpt", model2, ctl2, opt2) == 30
    _train(model2, opt2, 30, 50)
    ctl2.switch()
    assert [e.to_dict() for e in ctl2.history] == [e.to_dict() for e in ctl.history]
    torch.testing.assert_close(_logits(model2), _logits(model), rtol=0, atol=0)
    for name, layer in ctl.layers.items():
        assert torch.equal(layer.entered.A, ctl2.layers[name].entered.A)


def test_a_4bit_base_refuses_to_drop_its_records(tiny_llama):
    """Its fused pairs are its side factors (the 4-bit weight is never written): the error says so."""
    model = _load(tiny_llama)
    with pytest.raises(ValueError, match="keep fused_records=True"):
        SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20, fused_records=False))
