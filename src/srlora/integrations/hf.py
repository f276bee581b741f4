"""Hugging Face ``Trainer`` integration: one callback, no other call.

    ctl = SRLoRA(peft_model, SRLoRAConfig(r_target=64, total_steps="auto"))
    trainer = Trainer(model=peft_model, args=args, train_dataset=ds, callbacks=[SRLoRACallback(ctl)])
    trainer.train()          # or trainer.train(resume_from_checkpoint=True)

The callback attaches the controller to the optimizer the Trainer builds, so the
importance is computed from the gradients the optimizer applies: after unscaling and
clipping, once per optimizer step under gradient accumulation, and not at all on a step
the fp16 scaler skips. ``total_steps="auto"`` takes the Trainer's ``max_steps``. At every
checkpoint it writes ``srlora_state.pt`` (controller state and the frozen weights SRLoRA
changed, which PEFT's adapter checkpoint does not hold) into the checkpoint folder, and
restores it when the Trainer resumes. At every logging step it adds SRLoRA's figures to the
logs (``srlora/switches``, ``srlora/directions_used``, ``srlora/skipped_steps``, and after a
switch ``srlora/evicted_score``), so they reach the Trainer's reporting integrations.

With TRL, which builds the PEFT model itself from a ``peft_config``, or under DeepSpeed or
FSDP, give the callback the config instead of a controller: SRLoRA is then built when the
Trainer is (``on_init_end``), before it shards the model or loads a checkpoint, and follows
the sharding when training starts::

    trainer = SFTTrainer(model=base, peft_config=LoraConfig(...), train_dataset=ds, args=args,
                         callbacks=[SRLoRACallback(SRLoRAConfig(r_target=64, total_steps="auto"))])
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..atomic import atomic_torch_save
from ..checkpoint import STATE_FILE, method_state, method_state_file, restore_method_state
from ..config import SRLoRAConfig
from ..controller import SRLoRA
from ..optim_state import unwrap_optimizer
from .figures import build_controller, check_run_model, figures

__all__ = ["STATE_FILE", "SRLoRACallback", "unwrap_optimizer"]


class SRLoRACallback(TrainerCallback):
    """Drives an :class:`~srlora.SRLoRA` controller from a ``transformers.Trainer`` (or TRL's
    ``SFTTrainer``, which subclasses it).

    Args:
        controller: a controller built on the PEFT model, or an :class:`~srlora.SRLoRAConfig`:
            the controller is then built when training starts, on the PEFT model the trainer
            trains (TRL builds it from a ``peft_config``, after the callbacks exist).
        run_model: with a config that sets ``subspace_whiten``: ``run_model(peft_model)`` runs
            the model on text it should keep knowing, once, when the controller is built.
    """

    def __init__(self, controller: SRLoRA | SRLoRAConfig, run_model: Callable[[Any], object] | None = None) -> None:
        if isinstance(controller, SRLoRAConfig):
            self.config: SRLoRAConfig | None = controller
            self.controller: SRLoRA | None = None
        elif isinstance(controller, SRLoRA):
            self.config, self.controller = None, controller
        else:
            raise TypeError(
                f"SRLoRACallback needs an SRLoRA controller or an SRLoRAConfig, got {type(controller).__name__}."
            )
        self.run_model = check_run_model(self.config, run_model)
        self._logged_events = 0

    def on_init_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        """Built from a config: SRLoRA is built here, on the PEFT model the Trainer was given (TRL
        builds it from a ``peft_config`` in its constructor), before the Trainer shards it, hands it
        to DeepSpeed or loads a checkpoint into it: the SVD is of the pretrained weights."""
        if self.controller is None and self.config is not None and model is not None:
            self.controller = build_controller(_peft_model(model), self.config, self.run_model)
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if optimizer is None:
            raise RuntimeError("the Trainer passed no optimizer to on_train_begin; SRLoRA cannot attach.")
        if self.controller is None:
            assert self.config is not None
            if model is None:
                raise RuntimeError("the Trainer passed no model to on_train_begin; SRLoRA cannot be built.")
            if state.global_step > 0:
                raise RuntimeError(
                    "SRLoRACallback(config) must be built with the Trainer (Trainer(..., callbacks=[...])), not added "
                    "later: on a resume SRLoRA must decompose the pretrained weights before the checkpoint is loaded."
                )
            # The optimizer already holds the LoRA parameters; SRLoRA rewrites them in place.
            self.controller = build_controller(_peft_model(model), self.config, self.run_model)
        ctl = self.controller
        ctl.set_total_steps(int(state.max_steps))
        if ctl.attached:
            ctl.detach()
        ctl.attach(optimizer)  # through accelerate's wrappers (and, under ZeRO-3, DeepSpeed's optimizer)
        if state.global_step > 0 and ctl.global_step != state.global_step:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / method_state_file(ctl)
            if not path.is_file():
                raise FileNotFoundError(
                    f"The Trainer resumed at step {state.global_step}, but {path} is missing: the frozen weights "
                    f"and scores SRLoRA changed cannot be restored. Resume from a checkpoint written with "
                    f"SRLoRACallback in the callbacks."
                )
            restore_method_state(path, ctl.model, ctl)
        self._logged_events = len(ctl.history)
        _run_first(self)
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        """Adds SRLoRA's figures to the Trainer's logs (so TensorBoard, W&B... receive them)."""
        if logs is not None and self.controller is not None:
            logs.update(figures(self.controller, since_event=self._logged_events))
            self._logged_events = len(self.controller.history)
        return control

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        ctl = self.controller
        if ctl is None:
            return control
        name = method_state_file(ctl)  # one file, or one per rank of a sharded model
        if name != STATE_FILE or state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_torch_save(method_state(ctl.model, ctl), folder / name)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.controller is not None:
            self.controller.detach()
        return control


def _peft_model(model: Any) -> Any:
    """The PEFT model inside what the Trainer passes (it may be wrapped, e.g. by DDP)."""
    for _ in range(4):
        if hasattr(model, "peft_config"):
            return model
        model = getattr(model, "module", model)
    raise TypeError(
        f"SRLoRACallback built from a config needs a PEFT model; the Trainer trains a {type(model).__name__}. "
        f"Pass a peft_config to the trainer (TRL) or wrap the model with peft.get_peft_model first."
    )


def _run_first(callback: TrainerCallback) -> None:
    """Move ``callback`` to the front of the Trainer's callback list, so that its ``on_log``
    adds SRLoRA's figures before the reporting integrations (TensorBoard, W&B...) read the
    logs: the Trainer puts user callbacks after them. The handler is the caller of the
    event (``CallbackHandler.call_event``); if it is not found, the figures reach only the
    callbacks registered after this one."""
    from transformers.trainer_callback import CallbackHandler

    frame = inspect.currentframe()
    for _ in range(6):
        frame = frame.f_back if frame is not None else None
        handler = frame.f_locals.get("self") if frame is not None else None
        if isinstance(handler, CallbackHandler):
            if callback in handler.callbacks:
                handler.callbacks.remove(callback)
                handler.callbacks.insert(0, callback)
            return
