"""The invariants on a CUDA device (skipped without one; scripts/gpu_check.sh runs them):
init and switch keep the output, scores match the CPU, exact resume, bf16, the gradient
policy, and at most one device-to-host sync per step outside switch steps."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import CASES, adam, hand_scores, make_peft

from srlora import SRLoRA, SRLoRAConfig, load_checkpoint, save_checkpoint
from srlora.targets import find_lora_targets

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def _build(case_name: str, device: torch.device, **config):
    model = make_peft(CASES[case_name], r=4).to(device)
    config = {"r_target": 16, "switch_interval": 20, **config}
    return model, SRLoRA(model, SRLoRAConfig(**config))


def _batch(case_name: str, g: torch.Generator, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in CASES[case_name].batch(g).items()}


def _logits(case_name: str, model) -> torch.Tensor:
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        b = _batch(case_name, torch.Generator().manual_seed(3), device)
        return CASES[case_name].logits(model, b).float().cpu()


@pytest.mark.parametrize("case_name", ["mlp", "bert", "gpt2"])
def test_init_and_switch_keep_the_output_on_cuda(case_name):
    reference = _logits(case_name, make_peft(CASES[case_name], r=4).to(CUDA))
    model, ctl = _build(case_name, CUDA)
    torch.testing.assert_close(_logits(case_name, model), reference, rtol=1e-4, atol=1e-5)
    opt = adam(model)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(5):
        CASES[case_name].loss(model, _batch(case_name, g, CUDA)).backward()
        opt.step()
        opt.zero_grad()
    before = _logits(case_name, model)
    for _ in range(3):
        assert ctl.switch()
    torch.testing.assert_close(_logits(case_name, model), before, rtol=1e-4, atol=1e-5)


def test_scores_on_cuda_match_a_hand_computation():
    model, ctl = _build("bert", CUDA, switch_interval=1000)
    target = find_lora_targets(model, "default")[0]
    g = torch.Generator().manual_seed(0)
    snaps = []
    model.train()
    for _ in range(4):
        CASES["bert"].loss(model, _batch("bert", g, CUDA)).backward()
        snaps.append(
            tuple(
                t.detach().double().cpu()
                for t in (target.lora_A, target.lora_A.grad, target.lora_B, target.lora_B.grad)
            )
        )
        ctl.update_importance()
        model.zero_grad()
    torch.testing.assert_close(ctl.pair_scores()[target.name].cpu(), hand_scores(snaps).float(), rtol=1e-5, atol=1e-12)


def test_resume_on_cuda_is_exact(tmp_path):
    def run(model, ctl, opt, start, stop):
        for step in range(start, stop):
            g = torch.Generator().manual_seed(100 + step)
            CASES["mlp"].loss(model, _batch("mlp", g, CUDA)).backward()
            opt.step()
            opt.zero_grad()

    model, ctl = _build("mlp", CUDA)
    opt = adam(model)
    ctl.attach(opt)
    run(model, ctl, opt, 0, 30)
    save_checkpoint(tmp_path / "c.ckpt", model, ctl, opt)
    run(model, ctl, opt, 30, 50)
    model2, ctl2 = _build("mlp", CUDA)
    opt2 = adam(model2)
    ctl2.attach(opt2)
    load_checkpoint(tmp_path / "c.ckpt", model2, ctl2, opt2)
    run(model2, ctl2, opt2, 30, 50)
    assert ctl2.history == ctl.history and ctl.history
    for (k, v), (_, v2) in zip(model.state_dict().items(), model2.state_dict().items(), strict=True):
        assert torch.equal(v, v2), k


def test_bf16_weights_on_cuda():
    model = make_peft(CASES["bert"], r=4).to(CUDA, torch.bfloat16)
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, switch_interval=20))
    before = _logits("bert", model)
    for _ in range(5):
        ctl.switch()
    # Each switch rounds W once to bf16 (2^-9 relative).
    torch.testing.assert_close(_logits("bert", model), before, rtol=0, atol=5e-2)


def test_gradient_policy_on_cuda():
    model, ctl = _build("bert", CUDA, switch_interval=30, direction_policy="gradient")
    opt = adam(model)
    ctl.attach(opt)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(29):
        CASES["bert"].loss(model, _batch("bert", g, CUDA)).backward()
        opt.step()
        opt.zero_grad()
    before = _logits("bert", model)
    events = ctl.switch()
    assert events and all(len(e.directions) == 2 for e in events)
    torch.testing.assert_close(_logits("bert", model), before, rtol=1e-4, atol=1e-5)


def test_at_most_one_device_sync_per_step_outside_switches():
    """torch.cuda.set_sync_debug_mode warns at every device-to-host synchronisation."""

    def syncs(model, opt, steps: int) -> int:
        g = torch.Generator().manual_seed(0)
        batches = [_batch("bert", g, CUDA) for _ in range(steps)]
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for b in batches:
                    CASES["bert"].loss(model, b).backward()
                    opt.step()
                    opt.zero_grad()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return sum("synchroniz" in str(w.message) for w in record)

    plain = make_peft(CASES["bert"], r=4).to(CUDA)
    base = syncs(plain, adam(plain), 6)
    model, ctl = _build("bert", CUDA, switch_interval=1000)
    opt = adam(model)
    ctl.attach(opt)
    assert syncs(model, opt, 6) - base <= 6


def test_a_switch_step_syncs_as_often_whatever_the_number_of_layers():
    """A switch reads every layer's scores and finiteness in one transfer, not per layer."""
    counts = {}
    for layers in (2, 6):
        from test_hot_path import _model

        model = _model(layers).to(CUDA)
        ctl = SRLoRA(model, SRLoRAConfig(r_target=12, switch_interval=1000))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
        ctl.attach(opt)
        ids = torch.randint(0, 50, (4, 8), device=CUDA)
        model(input_ids=ids, labels=torch.zeros(4, dtype=torch.long, device=CUDA)).loss.backward()
        opt.step()
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ctl.switch()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts[layers] = sum("synchroniz" in str(w.message) for w in record)
    assert counts[2] == counts[6] <= 2, counts


def test_a_cpu_and_a_cuda_run_agree():
    """The same steps on both devices give the same scores and switches (to float32 noise)."""
    out = {}
    for device in (torch.device("cpu"), CUDA):
        model, ctl = _build("mlp", device, switch_interval=20)
        opt = adam(model)
        ctl.attach(opt)
        g = torch.Generator().manual_seed(0)
        for _ in range(25):
            CASES["mlp"].loss(model, _batch("mlp", g, device)).backward()
            opt.step()
            opt.zero_grad()
        out[device.type] = (ctl.slot_directions(), {k: v.cpu() for k, v in ctl.pair_scores().items()})
    assert out["cpu"][0] == out["cuda"][0]
    for name, scores in out["cpu"][1].items():
        torch.testing.assert_close(out["cuda"][1][name], scores, rtol=1e-3, atol=1e-9)
