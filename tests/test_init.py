"""Construction: SVD + PiSSA initialisation leave the model's function unchanged."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import CASES, build, logits, make_base, make_peft

from srlora import SRLoRA, SRLoRAConfig
from srlora.svd import top_singular_triplets
from srlora.targets import find_lora_targets


def test_output_unchanged_by_construction(case_name):
    case = CASES[case_name]
    untouched = logits(case_name, make_base(case))
    model, _ = build(case_name)
    # fp32: the residual W0 - sBA plus sBA reproduces W0 to a few ulps of |W0|.
    torch.testing.assert_close(logits(case_name, model), untouched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("alpha,rslora", [(8, False), (4, False), (16, True)])
def test_equals_peft_pissa(case_name, alpha, rslora):
    """Same A, B, residual W and logits as PEFT's own ``init_lora_weights="pissa"``."""
    ours, _ = build(case_name, alpha=alpha, lora_kwargs={"use_rslora": rslora}, svd_method="full")
    theirs = make_peft(CASES[case_name], alpha=alpha, use_rslora=rslora, init_lora_weights="pissa")
    for a, b in zip(find_lora_targets(ours, "default"), find_lora_targets(theirs, "default"), strict=True):
        assert a.name == b.name
        assert a.scaling == b.scaling
        # Same LAPACK call on the same matrix: identical singular vectors, so only the
        # rounding of the sqrt/scaling products differs (a few float32 ulps).
        torch.testing.assert_close(a.lora_A, b.lora_A, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.lora_B, b.lora_B, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(a.weight, b.weight, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(logits(case_name, ours), logits(case_name, theirs), atol=1e-5, rtol=1e-5)


def test_pissa_product_is_top_r_svd():
    """s * B A equals U_r diag(S_r) V_r^T of W0, and W holds the rest, for any alpha."""
    case = CASES["mlp"]
    w0 = make_base(case).fc1.weight.detach().clone()
    model, _ = build("mlp", alpha=3)
    target = next(t for t in find_lora_targets(model, "default") if t.name.endswith("fc1"))
    U, S, Vh = torch.linalg.svd(w0)
    expected = U[:, :4] @ torch.diag(S[:4]) @ Vh[:4]
    torch.testing.assert_close(target.scaling * target.lora_B @ target.lora_A, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target.weight, w0 - expected, atol=1e-5, rtol=1e-5)


def test_nonzero_adapter_is_kept():
    """A LoRA that already carries an update: SRLoRA decomposes W + sBA, output unchanged."""
    model = make_peft(CASES["mlp"])
    torch.manual_seed(5)
    for t in find_lora_targets(model, "default"):
        t.lora_B.data.normal_(0, 0.3)
    before = logits("mlp", model)
    SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    torch.testing.assert_close(logits("mlp", model), before, atol=1e-5, rtol=1e-5)


def test_randomized_svd_matches_full_on_top_directions():
    g = torch.Generator().manual_seed(0)
    # A matrix with a decaying spectrum, as pretrained weights have.
    U, _ = torch.linalg.qr(torch.randn(200, 200, generator=g))
    V, _ = torch.linalg.qr(torch.randn(120, 120, generator=g))
    S = torch.logspace(1, -2, 120)
    W = U[:, :120] @ torch.diag(S) @ V.T
    full = top_singular_triplets(W, 24, "full")
    approx = top_singular_triplets(W, 24, "randomized", niter=4, oversample=16, seed=1)
    torch.testing.assert_close(approx.S, full.S, rtol=1e-3, atol=1e-4)
    # Singular vectors agree up to sign.
    cos = (approx.U * full.U).sum(0).abs()
    torch.testing.assert_close(cos[:12], torch.ones(12), atol=1e-3, rtol=0)
    # Seeded: the same directions every time, and the global RNG is untouched.
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = top_singular_triplets(W, 24, "randomized", seed=1)
    assert torch.equal(torch.rand(1), before)
    assert torch.equal(again.U, approx.U)


def test_svd_cache_size_and_device():
    model, ctl = build("bert", r_target=16, svd_device="cpu")
    expected = 0
    for t in find_lora_targets(model, "default"):
        m, n = t.shape
        k = min(16, m, n)
        expected += 4 * (m * k + k + n * k)
    assert ctl.svd_cache_bytes() == expected
    assert all(layer.cache.U.device.type == "cpu" for layer in ctl.layers.values())


def test_bf16_model_init_in_float32():
    case = CASES["mlp"]
    base = make_base(case).to(torch.bfloat16)
    x = case.batch(torch.Generator().manual_seed(0))["x"].to(torch.bfloat16)
    with torch.no_grad():
        ref = base(x).float()
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=case.targets))
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    for layer in ctl.layers.values():
        assert layer.cache.U.dtype == torch.float32
    with torch.no_grad():
        out = model(x).float()
    # bf16 keeps 8 bits of mantissa: W0 - sBA rounded once costs ~2^-8 relative.
    torch.testing.assert_close(out, ref, atol=3e-2, rtol=3e-2)
