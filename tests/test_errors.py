"""Bad input gets a clear error that names the fix."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import CASES, MLP, build, make_base
from torch import nn

from srlora import SRLoRA, SRLoRAConfig


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"r_target": 16}, ValueError, "give total_steps=N"),
        ({"r_target": 0, "total_steps": 10}, ValueError, "r_target must be >= 1"),
        ({"r_target": 16.0, "total_steps": 10}, TypeError, "r_target must be an integer"),
        ({"r_target": 16, "total_steps": 10, "gamma": 0.0}, ValueError, r"gamma must lie in \(0, 1\]"),
        ({"r_target": 16, "total_steps": 10, "gamma": 1.5}, ValueError, r"gamma must lie in \(0, 1\]"),
        ({"r_target": 16, "total_steps": 10, "beta1": 1.0}, ValueError, "beta1 must lie in"),
        ({"r_target": 16, "total_steps": 0}, ValueError, "total_steps must be >= 1"),
        ({"r_target": 16, "switch_interval": -3}, ValueError, "switch_interval must be >= 1"),
        ({"r_target": 16, "total_steps": 10, "optimizer_reset": "yes"}, ValueError, "optimizer_reset must be one of"),
        ({"r_target": 16, "total_steps": 10, "svd_method": "lanczos"}, ValueError, "svd_method must be one of"),
        ({"r_target": 16, "total_steps": 10, "reset_scores": "some"}, ValueError, "reset_scores must be one of"),
    ],
)
def test_config_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        SRLoRAConfig(**kwargs)


def test_config_round_trip():
    cfg = SRLoRAConfig(r_target=32, total_steps=100, gamma=0.25)
    assert SRLoRAConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="Unknown SRLoRAConfig fields"):
        SRLoRAConfig.from_dict({**cfg.to_dict(), "rtarget": 3})


def test_non_integer_gamma_times_r():
    with pytest.raises(ValueError, match=r"gamma \* r must be a whole number.*gamma=0.3 and r=4"):
        build("mlp", r=4, gamma=0.3)


def test_r_target_not_above_r():
    with pytest.raises(ValueError, match=r"r_target \(4\) must be larger than the LoRA rank r \(4\)"):
        build("mlp", r=4, r_target=4)


def test_not_a_peft_model():
    with pytest.raises(TypeError, match="get_peft_model"):
        SRLoRA(MLP(), SRLoRAConfig(r_target=16, total_steps=100))


def test_config_type():
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(TypeError, match="SRLoRAConfig"):
        SRLoRA(model, {"r_target": 16})


class WithEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.fc = nn.Linear(32, 32)
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, ids):
        return self.fc(self.emb(ids))


@pytest.mark.parametrize("target,kind", [("emb", "Embedding"), ("conv", "Conv2d")])
def test_other_layer_types_rejected(target, kind):
    model = peft.get_peft_model(WithEmbedding(), peft.LoraConfig(r=4, target_modules=["fc", target]))
    with pytest.raises(ValueError, match=rf"layer 'base_model.model.{target}' is a .*{kind}.*exclude it"):
        SRLoRA(model, SRLoRAConfig(r_target=16, total_steps=100))


def test_dora_rejected():
    model = peft.get_peft_model(MLP(), peft.LoraConfig(r=4, target_modules=["fc1"], use_dora=True))
    with pytest.raises(ValueError, match=r"LoRA variant.*without use_dora"):
        SRLoRA(model, SRLoRAConfig(r_target=16, total_steps=100))


class Int8Linear(nn.Linear):
    """Stands in for a quantized base layer: an nn.Linear subclass PEFT still wraps."""


def test_quantized_or_custom_base_rejected():
    base = MLP()
    base.fc1 = Int8Linear(48, 80)
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["fc1"]))
    with pytest.raises(ValueError, match=r"wraps a Int8Linear.*unquantized"):
        SRLoRA(model, SRLoRAConfig(r_target=16, total_steps=100))


def test_merged_adapter_rejected():
    model = peft.get_peft_model(make_base(CASES["mlp"]), peft.LoraConfig(r=4, target_modules=["fc1"]))
    model.merge_adapter()
    with pytest.raises(ValueError, match="unmerge_adapter"):
        SRLoRA(model, SRLoRAConfig(r_target=16, total_steps=100))


def test_rank_above_layer_width():
    base = nn.Sequential(nn.Linear(6, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["0"]))
    with pytest.raises(ValueError, match="r=8 exceeds min"):
        SRLoRA(model, SRLoRAConfig(r_target=16, total_steps=100))


def test_load_state_dict_from_other_model():
    _, a = build("mlp")
    _, b = build("bert")
    with pytest.raises(ValueError, match="does not match this model's layers"):
        b.load_state_dict(a.state_dict())


def test_short_interval_warns():
    from srlora import SRLoRAWarning

    with pytest.warns(SRLoRAWarning, match="shorter than the 19 steps"):
        build("mlp", r=4, r_target=16, switch_interval=5)


def test_placement_other_than_fsdp2_row_sharding_refused():
    """FSDP2's default, Shard(0) over a 1-D mesh, is supported (tests/test_distributed.py);
    any other placement of an adapted layer's weight is refused with what is supported,
    before any weight changes."""
    import torch.distributed as dist
    from torch.distributed.tensor import DeviceMesh, DTensor, Replicate

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    model = peft.get_peft_model(make_base(CASES["mlp"]), peft.LoraConfig(r=4, target_modules=["fc1"]))
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        mesh = DeviceMesh("cpu", [0])
        fc1 = model.base_model.model.fc1.base_layer
        fc1.weight = torch.nn.Parameter(DTensor.from_local(fc1.weight.data, mesh, [Replicate()]), requires_grad=False)
        before = fc1.weight.to_local().clone()
        with pytest.raises(ValueError, match=r"Shard\(0\) over a 1-D mesh"):
            SRLoRA(model, SRLoRAConfig(r_target=16, total_steps=1000))
        torch.testing.assert_close(fc1.weight.to_local(), before, rtol=0, atol=0)
    finally:
        dist.destroy_process_group()
