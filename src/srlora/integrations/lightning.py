"""PyTorch Lightning integration: one callback, the same guarantees as the Trainer's.

    ctl = SRLoRA(peft_model, SRLoRAConfig(r_target=64, total_steps="auto"))
    trainer = lightning.pytorch.Trainer(max_steps=1000, callbacks=[SRLoRALightningCallback(ctl)])
    trainer.fit(module)      # module.model is peft_model

When fitting starts the callback attaches the controller to the optimizer Lightning
built. Lightning runs backward and gradient clipping inside the closure it passes to
``optimizer.step``, and the controller updates the importance right after that closure,
so the scores see the clipped (and, under AMP, unscaled) gradients, once per optimizer
step under ``accumulate_grad_batches``. ``total_steps="auto"`` takes
``trainer.estimated_stepping_batches``. After every training batch it logs SRLoRA's figures
(``srlora/switches``, ``srlora/directions_used``, ``srlora/skipped_steps``, after a switch
``srlora/evicted_score``) with ``pl_module.log``. The controller's state is this callback's state
in Lightning checkpoints (Lightning's own checkpoint holds the whole module, frozen
weights included), so ``trainer.fit(module, ckpt_path=...)`` resumes it.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch import Callback

from ..controller import SRLoRA
from .figures import figures


class SRLoRALightningCallback(Callback):
    """Drives an :class:`~srlora.SRLoRA` controller from a Lightning ``Trainer``."""

    def __init__(self, controller: SRLoRA) -> None:
        if not isinstance(controller, SRLoRA):
            raise TypeError(f"SRLoRALightningCallback needs an SRLoRA controller, got {type(controller).__name__}.")
        self.controller = controller
        self._pending: dict[str, Any] | None = None
        self._logged_events = 0

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        if len(trainer.optimizers) != 1:
            raise ValueError(f"SRLoRA drives one optimizer; this module configures {len(trainer.optimizers)}.")
        ctl = self.controller
        steps = trainer.estimated_stepping_batches
        if steps == float("inf"):
            if ctl.config.total_steps == "auto" and ctl.config.switch_interval is None:
                raise ValueError("total_steps='auto' needs a finite max_steps or max_epochs on the Lightning Trainer.")
        else:
            ctl.set_total_steps(int(steps))
        if ctl.attached:
            ctl.detach()
        ctl.attach(trainer.optimizers[0])  # attach finds the optimizer that steps (DeepSpeed: its ZeRO one)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        self.controller.detach()

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """SRLoRA's figures through Lightning's own logging (its loggers receive them)."""
        values = figures(self.controller, since_event=self._logged_events)
        self._logged_events = len(self.controller.history)
        for name, value in values.items():
            pl_module.log(name, value, on_step=True, on_epoch=False, prog_bar=False, logger=True)

    def state_dict(self) -> dict[str, Any]:
        return {"controller": self.controller.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.controller.load_state_dict(state_dict["controller"])
