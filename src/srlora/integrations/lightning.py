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
weights included), so ``trainer.fit(module, ckpt_path=...)`` resumes it; under a sharded
strategy (``ModelParallelStrategy``, DeepSpeed) each rank's state is kept and given back to it.

Under DDP, give the callback the controller or the config. Given an :class:`~srlora.SRLoRAConfig`
instead of a controller, the callback builds SRLoRA in its ``setup`` hook, on the PEFT model
inside the LightningModule: after the process group exists (the SVD is computed on rank 0
and broadcast), before ``configure_model``, before the strategy wraps or shards the model and
before a checkpoint is restored into it, so the SVD is of the pretrained weights::

    trainer = lightning.pytorch.Trainer(strategy="ddp", callbacks=[SRLoRALightningCallback(SRLoRAConfig(...))])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lightning.pytorch import Callback

from ..config import SRLoRAConfig
from ..controller import SRLoRA
from ..errors import CheckpointError
from .figures import build_controller, check_run_model, figures


class SRLoRALightningCallback(Callback):
    """Drives an :class:`~srlora.SRLoRA` controller from a Lightning ``Trainer``.

    Args:
        controller: a controller built on the PEFT model the LightningModule trains, or an
            :class:`~srlora.SRLoRAConfig`: the controller is then built in ``setup``, on the
            PEFT model found inside the LightningModule.
        run_model: with a config that sets ``subspace_whiten``: ``run_model(peft_model)`` runs
            the model on text it should keep knowing, once, when the controller is built.
    """

    def __init__(self, controller: SRLoRA | SRLoRAConfig, run_model: Callable[[Any], object] | None = None) -> None:
        if isinstance(controller, SRLoRAConfig):
            self.config: SRLoRAConfig | None = controller
            self._controller: SRLoRA | None = None
        elif isinstance(controller, SRLoRA):
            self.config, self._controller = None, controller
        else:
            raise TypeError(
                "SRLoRALightningCallback needs an SRLoRA controller or an SRLoRAConfig, "
                f"got {type(controller).__name__}."
            )
        self.run_model = check_run_model(self.config, run_model)
        self._logged_events = 0

    @property
    def controller(self) -> SRLoRA:
        if self._controller is None:
            raise RuntimeError(
                "SRLoRALightningCallback(config) builds SRLoRA when fitting starts (its setup hook); "
                "there is no controller before trainer.fit."
            )
        return self._controller

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        """Built from a config: SRLoRA is built here, before the strategy wraps or shards the
        model and before a checkpoint is restored into it."""
        if self._controller is None and self.config is not None and stage == "fit":
            self._controller = build_controller(_peft_model(pl_module), self.config, self.run_model)

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
        """The controller's state. Under a sharded model (FSDP2, ZeRO) it differs from rank to
        rank (each holds its rows of the fused records) while Lightning writes the callbacks'
        states from rank 0 alone: every rank's state is gathered to rank 0 (a collective;
        Lightning calls this on every rank when it saves) and each rank reloads its own."""
        state = self.controller.state_dict()
        stamp = state["rank"]  # set only where the state is per rank (sharded, several ranks)
        if stamp is None:
            return {"controller": state}
        import torch.distributed as dist

        states: list[Any] | None = [None] * stamp["world"] if stamp["rank"] == 0 else None
        dist.gather_object(state, states, dst=0)
        return {"controller_per_rank": states}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "controller_per_rank" not in state_dict:
            self.controller.load_state_dict(state_dict["controller"])
            return
        import torch.distributed as dist

        states = state_dict["controller_per_rank"]
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if states is None or len(states) != world:
            saved = "no" if states is None else len(states)
            raise CheckpointError(
                f"this Lightning checkpoint holds SRLoRA's state of a sharded model for {saved} ranks; this run has "
                f"{world}. Resume with the world size that saved it."
            )
        self.controller.load_state_dict(states[dist.get_rank() if world > 1 else 0])


def _peft_model(pl_module: Any) -> Any:
    """The PEFT model the LightningModule trains: itself, or its first submodule that is one."""
    for module in pl_module.modules():
        if hasattr(module, "peft_config"):
            return module
    raise TypeError(
        f"SRLoRALightningCallback built from a config needs a PEFT model inside the LightningModule; "
        f"{type(pl_module).__name__} holds none. Wrap the model with peft.get_peft_model in the module's __init__, "
        f"or build SRLoRA yourself and pass the controller."
    )
