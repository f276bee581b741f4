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
restores it when the Trainer resumes.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from ..atomic import atomic_torch_save
from ..checkpoint import method_state, restore_method_state
from ..controller import SRLoRA
from ..optim_state import unwrap_optimizer

__all__ = ["STATE_FILE", "SRLoRACallback", "unwrap_optimizer"]

STATE_FILE = "srlora_state.pt"


class SRLoRACallback(TrainerCallback):
    """Drives an :class:`~srlora.SRLoRA` controller from a ``transformers.Trainer``."""

    def __init__(self, controller: SRLoRA) -> None:
        if not isinstance(controller, SRLoRA):
            raise TypeError(f"SRLoRACallback needs an SRLoRA controller, got {type(controller).__name__}.")
        self.controller = controller

    def on_train_begin(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        ctl = self.controller
        if optimizer is None:
            raise RuntimeError("the Trainer passed no optimizer to on_train_begin; SRLoRA cannot attach.")
        ctl.set_total_steps(int(state.max_steps))
        if ctl.attached:
            ctl.detach()
        ctl.attach(unwrap_optimizer(optimizer))
        if state.global_step > 0 and ctl.global_step != state.global_step:
            path = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
            if not path.is_file():
                raise FileNotFoundError(
                    f"The Trainer resumed at step {state.global_step}, but {path} is missing: the frozen weights "
                    f"and scores SRLoRA changed cannot be restored. Resume from a checkpoint written with "
                    f"SRLoRACallback in the callbacks."
                )
            restore_method_state(path, ctl.model, ctl)
        return control

    def on_save(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            atomic_torch_save(method_state(self.controller.model, self.controller), folder / STATE_FILE)
        return control

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.controller.detach()
        return control
