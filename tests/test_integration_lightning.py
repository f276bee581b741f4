"""PyTorch Lightning: one callback, clipped and accumulated gradients, state in checkpoints."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import CASES, hand_scores, make_base

from srlora import SRLoRA, SRLoRAConfig
from srlora.targets import find_lora_targets

pl = pytest.importorskip("lightning.pytorch")
HERE = Path(__file__).parent
from srlora.integrations.lightning import SRLoRALightningCallback  # noqa: E402


class Module(pl.LightningModule):
    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):
        return self.model(input_ids=batch[0], labels=batch[1]).loss

    def configure_optimizers(self):
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)


def _loader():
    g = torch.Generator().manual_seed(0)
    ids, labels = torch.randint(0, 100, (64, 12), generator=g), torch.randint(0, 3, (64,), generator=g)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids, labels), batch_size=4, shuffle=False)


def _build():
    model = peft.get_peft_model(
        make_base(CASES["bert"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES["bert"].targets)
    )
    return model, SRLoRA(model, SRLoRAConfig(r_target=16, gamma=0.5, total_steps="auto"))


def _trainer(tmp_path, callbacks, **kw):
    args = dict(
        max_steps=120,
        accumulate_grad_batches=2,
        gradient_clip_val=0.05,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(tmp_path),
        deterministic=True,
    )
    args.update(kw)
    return pl.Trainer(callbacks=callbacks, **args)


class Recorder(pl.Callback):
    """Weights before each optimizer step, and the gradients the step applied."""

    def __init__(self, layer) -> None:
        self.layer, self.snaps, self.norms, self._pre = layer, [], [], None

    def on_fit_start(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        t = self.layer

        def pre(o, a, k):
            self._pre = (t.lora_A.detach().double().clone(), t.lora_B.detach().double().clone())

        def post(o, a, k):
            A, B = self._pre
            self.snaps.append((A, t.lora_A.grad.double().clone(), B, t.lora_B.grad.double().clone()))
            grads = [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])))
            )

        opt.register_step_pre_hook(pre)
        opt.register_step_post_hook(post)


def test_lightning_callback_schedule_and_clipped_importance(tmp_path):
    model, ctl = _build()
    layer = find_lora_targets(model, "default")[-1]
    rec = Recorder(layer)
    trainer = _trainer(tmp_path, [SRLoRALightningCallback(ctl), rec])
    trainer.fit(Module(model), _loader())
    assert ctl.global_step == 120 == len(rec.snaps)
    # SRLoRA's figures went through pl_module.log: 5 switches of 12 layers, 4 + 5 * 2 directions.
    logged = trainer.logged_metrics
    assert float(logged["srlora/switches"]) == 60.0 and float(logged["srlora/directions_used"]) == 14.0
    assert float(logged["srlora/skipped_steps"]) == 0.0
    assert sorted({e.step for e in ctl.history}) == [20, 40, 60, 80, 100]
    assert max(rec.norms) <= 0.05 * (1 + 1e-4)
    last = max(e.step for e in ctl.history if e.layer == layer.name)
    fresh = next(list(e.slots) for e in ctl.history if e.layer == layer.name and e.step == last)
    torch.testing.assert_close(
        ctl.pair_scores()[layer.name][fresh], hand_scores(rec.snaps[last:])[fresh].float(), rtol=1e-4, atol=1e-14
    )
    assert not ctl.attached


def test_lightning_checkpoint_resume(tmp_path):
    """The controller's state travels in Lightning's checkpoint and is back before the
    first resumed step. (Lightning itself does not restore the position inside a plain
    DataLoader, so the resumed run is not compared bit for bit with an uninterrupted one;
    srlora.save_checkpoint gives that in a plain loop, see test_checkpoint.py.)"""
    model, ctl = _build()
    ckpt_cb = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=60, save_top_k=-1)
    _trainer(tmp_path / "a", [SRLoRALightningCallback(ctl), ckpt_cb], enable_checkpointing=True).fit(
        Module(model), _loader()
    )
    ckpt = next(p for p in (tmp_path / "ck").glob("*.ckpt") if "step=60" in p.name)
    saved = torch.load(ckpt, weights_only=False)
    (state,) = [v for k, v in saved["callbacks"].items() if "SRLoRALightningCallback" in k]
    assert state["controller"]["global_step"] == 60
    assert sorted({e["step"] for e in state["controller"]["history"]}) == [20, 40, 60]

    class AtStart(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            self.state = ctl2.state_dict()
            self.frozen = {k: v.clone() for k, v in pl_module.model.state_dict().items() if "base_layer" in k}

    model2, ctl2 = _build()
    probe = AtStart()
    _trainer(tmp_path / "b", [SRLoRALightningCallback(ctl2), probe]).fit(Module(model2), _loader(), ckpt_path=str(ckpt))
    restored = probe.state
    assert restored["global_step"] == 60 and restored["history"] == state["controller"]["history"]
    for name, layer in state["controller"]["layers"].items():
        for k, v in layer["importance"].items():
            assert torch.equal(restored["layers"][name]["importance"][k], v)
        assert restored["layers"][name]["pointer"] == layer["pointer"]
    # The frozen weights SRLoRA changed come back from Lightning's module checkpoint.
    for k, v in probe.frozen.items():
        assert torch.equal(v, saved["state_dict"]["model." + k]), k
    # Training then goes on with the same schedule.
    assert ctl2.global_step == 120
    assert sorted({e.step for e in ctl2.history}) == [20, 40, 60, 80, 100]


def test_adaptive_state_restored_before_schedule_exists():
    """Lightning restores callback state before on_fit_start builds an 'auto' schedule:
    the adaptive trigger's counters must survive that order."""
    model, ctl = _build()
    ctl.set_total_steps(120)
    state = ctl.state_dict()
    model2 = peft.get_peft_model(
        make_base(CASES["bert"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES["bert"].targets)
    )
    adaptive = SRLoRA(model2, SRLoRAConfig(r_target=16, gamma=0.5, total_steps="auto", adaptive_switch=True))
    with pytest.raises(ValueError, match=r"adaptive_switch=False \(here True\)"):
        adaptive.load_state_dict(state)
    src = SRLoRA(model, SRLoRAConfig(r_target=16, gamma=0.5, total_steps="auto", adaptive_switch=True))
    src.set_total_steps(120)
    for layer in src.layers.values():
        layer.trigger.since_switch, layer.trigger.stable = 7, 3
    adaptive.load_state_dict(src.state_dict())  # before the schedule exists
    adaptive.set_total_steps(120)
    assert all((la.trigger.since_switch, la.trigger.stable) == (7, 3) for la in adaptive.layers.values())


@pytest.mark.distributed
def test_ddp_under_lightning_makes_the_switches_one_process_makes(tmp_path):
    """torchrun, 2 CPU processes, Lightning's DDP strategy (gloo), each rank on half of every
    global batch, against one process on the full batches; the callback given a controller built
    beforehand, or a config (built in its setup hook, after the process group exists): two
    Lightning runs in one launch.

    The decisions must be identical: the same pairs of the same layers at the same steps. The
    weights agree to 1e-3 relative, not to float32 rounding: the all-reduced gradient differs from
    the one-process gradient in its last bits, and 40 AdamW steps from the PiSSA start (large A
    and B) amplify that to ~1e-4 here whether or not a switch happens (measured: 8.7e-5 with the
    first switch at step 39, 7.9e-5 with three switches), while plain LoRA from B = 0 agrees to 2e-7."""
    import lightning_ddp_worker
    from launch import check, in_process, torchrun

    in_process(lightning_ddp_worker.main, [str(tmp_path), "--reference"])
    one = torch.load(tmp_path / "lightning-reference-rank0.pt", weights_only=False)
    assert one["steps"] == 40 and len(one["history"]) == 3 * 8  # 3 switch steps x 8 layers of 2 blocks
    key = [(e.step, e.layer, e.slots, e.directions, e.evicted) for e in one["history"]]
    check(torchrun(HERE / "lightning_ddp_worker.py", str(tmp_path), "--both"))
    for mode in ("controller", "config"):
        for k in (0, 1):
            rank = torch.load(tmp_path / f"lightning-{mode}-rank{k}.pt", weights_only=False)
            assert rank["steps"] == 40
            assert [(e.step, e.layer, e.slots, e.directions, e.evicted) for e in rank["history"]] == key, mode
            for name, w in one["weights"].items():
                err = float((rank["weights"][name] - w).norm() / w.norm().clamp_min(1e-12))
                assert err < 1e-3, (mode, name, err)


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory) -> Path:
    """Lightning's ModelParallelStrategy on 2 CPU ranks: a whole run, a run stopped after epoch 2
    and saved, and a run resumed from that save, in one launch; and the one-process reference."""
    import lightning_fsdp2_worker
    from launch import check, in_process, torchrun

    out = tmp_path_factory.mktemp("lightning-fsdp2")
    check(torchrun(HERE / "lightning_fsdp2_worker.py", str(out)))
    torch.save(in_process(lightning_fsdp2_worker.fit, out, 1, 0), out / "reference.pt")
    return out


@pytest.mark.distributed
def test_fsdp2_under_lightning_model_parallel_strategy_matches_one_process(fsdp2_runs):
    """torchrun, 2 CPU processes: Lightning's ModelParallelStrategy with the module's
    configure_model applying fully_shard (blocks, then the root, over the data-parallel mesh);
    SRLoRA from the callback's config, built in its setup hook before the shard. Against one
    process on the full batches: the same switches, effective weights within 1e-5, and the PEFT
    adapter exported from the sharded run equal (in plain PEFT) to the one-process export."""
    from launch import entry
    from test_distributed import _structure

    one = torch.load(fsdp2_runs / "reference.pt", weights_only=False)
    assert one["steps"] == 24 and len(one["history"]) == 2 * 12  # switches at steps 10, 20; 12 layers
    for k in (0, 1):
        rank = entry(fsdp2_runs / f"lightning-fsdp2-rank{k}.pt", "whole")
        assert rank["kinds"] == ["fsdp2"] and rank["steps"] == 24
        assert _structure(rank["history"]) == _structure(one["history"])
        for name, w in one["weights"].items():
            assert float((rank["weights"][name] - w).norm() / w.norm()) < 1e-5, name
    # The adapter exported from the sharded run, loaded by plain PEFT on one process on the
    # untouched base, computes what the one-process run's export computes.
    probe = CASES["bert"].batch(torch.Generator().manual_seed(5))
    logits = {}
    for tag in ("reference", "fsdp2"):
        loaded = peft.PeftModel.from_pretrained(make_base(CASES["bert"]), fsdp2_runs / f"adapter-lightning-{tag}")
        with torch.no_grad():
            logits[tag] = loaded.eval()(input_ids=probe["input_ids"]).logits
    torch.testing.assert_close(logits["fsdp2"], logits["reference"], rtol=1e-4, atol=1e-4)


@pytest.mark.distributed
def test_fsdp2_under_lightning_resumes_from_its_checkpoint_exactly(fsdp2_runs):
    """ModelParallelStrategy on 2 CPU ranks, stopped after epoch 2 (step 16, past the first
    switch) and saved with trainer.save_checkpoint (a distributed checkpoint whose callback
    states Lightning writes from rank 0 alone), then trainer.fit(ckpt_path=...): each rank gets
    its own SRLoRA state back (the fused records are row shards) and the run ends where the
    uninterrupted one ends, bit for bit."""
    from launch import entry

    for k in (0, 1):
        path = fsdp2_runs / f"lightning-fsdp2-rank{k}.pt"
        whole, again = entry(path, "whole"), entry(path, "resume")
        assert entry(path, "stop")["stopped_at"] == 16
        assert again["steps"] == whole["steps"] == 24 and again["history"] == whole["history"]
        for name, w in whole["weights"].items():
            assert torch.equal(again["weights"][name], w), name


def test_callback_built_from_a_config_takes_the_general_text_pass_of_subspace_whiten():
    """SRLoRALightningCallback(config, run_model=f): built in setup, f gets the PEFT model inside
    the module, and the whitening equals SRLoRA(model, config, run_model=...) built by hand."""
    config = SRLoRAConfig(
        r_target=8, gamma=0.5, total_steps="auto", direction_policy="gradient_subspace", subspace_whiten=4
    )
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(77))
    seen = []

    def run_model(model) -> None:
        seen.append(model)
        model(input_ids=ids)

    model = peft.get_peft_model(
        make_base(CASES["bert"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES["bert"].targets)
    )
    callback = SRLoRALightningCallback(config, run_model=run_model)
    callback.setup(None, Module(model), "fit")
    assert seen == [model]
    other = peft.get_peft_model(
        make_base(CASES["bert"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES["bert"].targets)
    )
    by_hand = SRLoRA(other, config, run_model=lambda: other(input_ids=ids)).state_dict()["directions"]
    for name, state in callback.controller.state_dict()["directions"].items():
        assert torch.equal(state["whiten_Q"], by_hand[name]["whiten_Q"]), name
    with pytest.raises(TypeError, match="run_model goes with an SRLoRAConfig"):
        SRLoRALightningCallback(callback.controller, run_model=run_model)
