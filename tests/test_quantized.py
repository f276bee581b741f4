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

from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM  # noqa: E402

from srlora import SRLoRA, SRLoRAConfig, load_checkpoint, save_checkpoint  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-llama")
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
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


def test_init_and_switches_keep_the_output_and_never_write_the_4bit_weight(tiny_llama):
    model = _load(tiny_llama)
    before, bytes_before = _logits(model), _quantized_bytes(model)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    assert all(layer.target.kind == "bnb" for layer in ctl.layers.values()) and len(ctl.layers) == 14
    torch.testing.assert_close(_logits(model), before, **LOGITS_TOL)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ctl.attach(opt)
    _train(model, opt, 0, 45)  # switches after steps 20 and 40
    assert {e.step for e in ctl.history} == {20, 40}
    for _ in range(3):
        trained, layers_before = _logits(model), _layer_outputs(ctl)
        assert ctl.switch()
        for name, out in _layer_outputs(ctl).items():  # the invariant itself, in float32
            torch.testing.assert_close(out, layers_before[name], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(_logits(model), trained, **LOGITS_TOL)
    after = _quantized_bytes(model)
    assert after.keys() == bytes_before.keys() and all(torch.equal(after[k], v) for k, v in bytes_before.items())
    # The side factors of the full budget: (m + n) * (2 * 16 - 4) float32 numbers per layer.
    layer = ctl.layers[ctl.layer_names[0]]
    m, n = layer.target.shape
    assert layer.side_factor_bytes == (m + n) * (2 * 16 - 4) * 4


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
        assert torch.equal(layer.target.entered_B, twin.target.entered_B) and torch.equal(layer.fused_A, twin.fused_A)


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
