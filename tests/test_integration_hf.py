"""Hugging Face Trainer: one callback, schedule from max_steps, clipped and accumulated
gradients, checkpoint and resume."""

from __future__ import annotations

import peft
import pytest
import torch
from conftest import CASES, hand_scores, make_base
from transformers import Trainer, TrainerCallback, TrainingArguments

from srlora import SRLoRA, SRLoRAConfig
from srlora.integrations import SRLoRACallback
from srlora.integrations.hf import unwrap_optimizer
from srlora.targets import find_lora_targets


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 64) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 100, (n, 12), generator=g)
        self.labels = torch.randint(0, 3, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.labels[i]}


def _model_and_ctl(**cfg):
    model = peft.get_peft_model(
        make_base(CASES["bert"]),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES["bert"].targets, modules_to_save=["classifier"]),
    )
    ctl = SRLoRA(model, SRLoRAConfig(r_target=16, gamma=0.5, total_steps="auto", **cfg))
    return model, ctl


def _args(tmp_path, **kw) -> TrainingArguments:
    base = dict(
        output_dir=str(tmp_path),
        max_steps=120,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-2,
        max_grad_norm=0.05,
        save_steps=60,
        logging_steps=1000,
        report_to=[],
        use_cpu=True,
        seed=0,
        data_seed=0,
        lr_scheduler_type="constant",
        disable_tqdm=True,
    )
    base.update(kw)
    return TrainingArguments(**base)


class Recorder(TrainerCallback):
    """Records what the optimizer sees at each step (its pre-hook runs after SRLoRA's)."""

    def __init__(self, layer) -> None:
        self.layer, self.snaps, self.norms = layer, [], []

    def on_train_begin(self, args, state, control, optimizer=None, **kw):
        def hook(opt, a, k):
            t = self.layer
            self.snaps.append(
                tuple(x.detach().double().clone() for x in (t.lora_A, t.lora_A.grad, t.lora_B, t.lora_B.grad))
            )
            grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(
                float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])))
            )

        unwrap_optimizer(optimizer).register_step_pre_hook(hook)


def test_trainer_callback_schedule_and_importance(tmp_path):
    model, ctl = _model_and_ctl()
    layer = find_lora_targets(model, "default")[-1]
    rec = Recorder(layer)
    trainer = Trainer(
        model=model, args=_args(tmp_path, save_steps=1000), train_dataset=Tokens(), callbacks=[SRLoRACallback(ctl), rec]
    )
    trainer.train()
    # One importance update and one step count per optimizer step (2 micro-batches each).
    assert ctl.global_step == 120 == len(rec.snaps)
    # total_steps='auto' took max_steps: N_switch = 6, t = 20, no switch at 120.
    assert ctl.schedule().steps() == [20, 40, 60, 80, 100]
    assert sorted({e.step for e in ctl.history}) == [20, 40, 60, 80, 100]
    # The gradients the optimizer applies are clipped (max_grad_norm = 0.05)...
    assert max(rec.norms) <= 0.05 * (1 + 1e-4)
    # ...and those are the ones the scores are made of (since the last switch of the layer).
    last = max(e.step for e in ctl.history if e.layer == layer.name)
    scores = ctl.pair_scores()[layer.name]
    fresh = next(list(e.slots) for e in ctl.history if e.layer == layer.name and e.step == last)
    # Recycled pairs restarted from zero at step `last`: their scores are the EMAs of the
    # (clipped) gradients of steps last+1 .. 120 exactly.
    torch.testing.assert_close(scores[fresh], hand_scores(rec.snaps[last:])[fresh].float(), rtol=1e-4, atol=1e-14)
    assert not ctl.attached  # detached at train end


def _final(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_trainer_resume_restores_frozen_weights_and_scores(tmp_path):
    model, ctl = _model_and_ctl()
    Trainer(model=model, args=_args(tmp_path / "a"), train_dataset=Tokens(), callbacks=[SRLoRACallback(ctl)]).train()
    ref, ref_hist = _final(model), [e.to_dict() for e in ctl.history]

    # Second run: stop after the checkpoint at step 60 (the switches at 20, 40, 60 changed W).
    model2, ctl2 = _model_and_ctl()
    Trainer(model=model2, args=_args(tmp_path / "b"), train_dataset=Tokens(), callbacks=[SRLoRACallback(ctl2)]).train()
    assert (tmp_path / "b" / "checkpoint-60" / "srlora_state.pt").is_file()
    model3, ctl3 = _model_and_ctl()
    Trainer(model=model3, args=_args(tmp_path / "b"), train_dataset=Tokens(), callbacks=[SRLoRACallback(ctl3)]).train(
        resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-60")
    )
    assert [e.to_dict() for e in ctl3.history] == ref_hist
    got = _final(model3)
    for k, v in ref.items():
        torch.testing.assert_close(got[k], v, atol=1e-6, rtol=1e-5, msg=k)


def test_resume_without_state_file_is_refused(tmp_path):
    model, ctl = _model_and_ctl()
    Trainer(model=model, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[SRLoRACallback(ctl)]).train()
    (tmp_path / "checkpoint-60" / "srlora_state.pt").unlink()
    model2, ctl2 = _model_and_ctl()
    trainer = Trainer(model=model2, args=_args(tmp_path), train_dataset=Tokens(), callbacks=[SRLoRACallback(ctl2)])
    with pytest.raises(FileNotFoundError, match=r"srlora_state\.pt is missing"):
        trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-60"))


class LogReader(TrainerCallback):
    """Stands for a reporting integration (TensorBoard, W&B): it reads the logs it is given."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kw):
        self.seen.append(dict(logs or {}))


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_logs_carry_srlora_figures_to_the_reporting_callbacks(tmp_path):
    model, ctl = _model_and_ctl()
    reader = LogReader()
    # The reader is registered first, as the Trainer registers its reporting integrations
    # before the user's callbacks: SRLoRA's callback moves itself in front of it.
    trainer = Trainer(
        model=model,
        args=_args(tmp_path, max_steps=45, save_steps=1000, logging_steps=10),
        train_dataset=Tokens(),
        callbacks=[reader, SRLoRACallback(ctl)],
    )
    trainer.train()
    logged = [logs for logs in reader.seen if "loss" in logs]
    assert len(logged) == 4 and all("srlora/switches" in logs for logs in logged)
    # N_switch = 6, t_interval = 45 // 6 = 7: by the logs at steps 10, 20, 30, 40 the 12 layers
    # have switched 1, 2, 4 and 5 times.
    assert [logs["srlora/switches"] for logs in logged] == [12.0, 24.0, 48.0, 60.0]
    assert logged[-1]["srlora/directions_used"] == 4 + 5 * 2 and logged[-1]["srlora/skipped_steps"] == 0
    # The evicted pairs' mean score appears in the logs that follow a switch.
    assert all("srlora/evicted_score" in logs and logs["srlora/evicted_score"] >= 0 for logs in logged)


@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_callback_built_from_a_config_builds_srlora_on_the_trained_peft_model(tmp_path):
    """TRL builds the PEFT model from a peft_config after the callbacks exist: the callback
    then takes an SRLoRAConfig and builds the controller when training starts."""
    model = peft.get_peft_model(
        make_base(CASES["bert"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES["bert"].targets)
    )
    callback = SRLoRACallback(SRLoRAConfig(r_target=16, gamma=0.5, total_steps="auto"))
    assert callback.controller is None
    Trainer(
        model=model, args=_args(tmp_path, max_steps=60, save_steps=1000), train_dataset=Tokens(), callbacks=[callback]
    ).train()
    ctl = callback.controller
    assert ctl is not None and ctl.model is model and ctl.global_step == 60
    assert sorted({e.step for e in ctl.history}) == [10, 20, 30, 40, 50]
    with pytest.raises(TypeError, match="controller or an SRLoRAConfig"):
        SRLoRACallback("r_target=64")


def _general_text(model) -> None:
    """``run_model`` for ``subspace_whiten``: the model's forward on ids no training batch holds."""
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(77))
    model(input_ids=ids)


def test_callback_built_from_a_config_takes_the_general_text_pass_of_subspace_whiten(tmp_path):
    """SRLoRACallback(config, run_model=f): f gets the PEFT model the Trainer trains, and the
    whitening it yields is the one SRLoRA(model, config, run_model=...) builds by hand."""
    config = SRLoRAConfig(
        r_target=8, gamma=0.5, total_steps="auto", direction_policy="gradient_subspace", subspace_whiten=4
    )
    seen = []

    def run_model(model) -> None:
        seen.append(model)
        _general_text(model)

    def peft_model():
        return peft.get_peft_model(
            make_base(CASES["bert"]), peft.LoraConfig(r=4, lora_alpha=8, target_modules=CASES["bert"].targets)
        )

    model = peft_model()
    callback = SRLoRACallback(config, run_model=run_model)
    Trainer(
        model=model, args=_args(tmp_path, max_steps=60, save_steps=1000), train_dataset=Tokens(), callbacks=[callback]
    ).train()
    ctl = callback.controller
    assert seen == [model] and ctl is not None and ctl.history  # built once, on that model; it switched
    other = peft_model()
    by_hand = SRLoRA(other, config, run_model=lambda: _general_text(other)).state_dict()["directions"]
    for name, state in ctl.state_dict()["directions"].items():
        assert torch.equal(state["whiten_Q"], by_hand[name]["whiten_Q"]), name
        assert torch.equal(state["whiten_gain"], by_hand[name]["whiten_gain"]), name
    with pytest.raises(TypeError, match="run_model goes with an SRLoRAConfig"):
        SRLoRACallback(ctl, run_model=run_model)
