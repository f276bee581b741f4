"""The SRLoRA controller: turns a PEFT LoRA model into SRLoRA and runs the method.

Usage, plain PyTorch loop::

    model = peft.get_peft_model(base, LoraConfig(r=8, lora_alpha=8, target_modules=[...]))
    ctl = SRLoRA(model, SRLoRAConfig(r_target=64, total_steps=1000))   # SVD + PiSSA init
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    ctl.attach(opt)  # importance before each step, scheduled switch after it; nothing else to call

Without ``attach``: ``loss.backward(); ctl.update_importance(); opt.step(); ctl.step(opt)``.

The controller owns the step count, the switch history and the optimizer-reset policy;
each layer's state is a :class:`~srlora.layer.LayerState` (read-only mapping
:attr:`SRLoRA.layers`). All of it is in :meth:`SRLoRA.state_dict`; the frozen-weight
changes are in the model's own ``state_dict`` (PEFT keeps the base weights as parameters).
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from . import collective
from .config import SRLoRAConfig, SwitchBudget
from .directions import policy_class, policy_for
from .errors import CheckpointError, DirectionsExhaustedWarning, NonFiniteWarning, ScheduleWarning
from .importance import update_importance_from_targets_
from .layer import LayerState, SwitchEvent, check_build_order, refuse
from .memory import owned_bytes
from .optim_state import OptimizerStateReset, require_params, run_before_step, unwrap_optimizer
from .schedule import SwitchSchedule, adaptive_trigger, warn_clamped, warn_short_interval
from .svd import SVDCache
from .switch import adaptive_due, apply_switches, build_groups, mark_exhausted, switch_groups, switch_inputs
from .targets import find_lora_targets, is_sharded_model

logger = logging.getLogger("srlora")


_NO_SCHEDULE = (
    "SRLoRA was built with total_steps='auto' and nobody has supplied the number of steps yet: use the "
    "Trainer/Lightning callback (srlora.integrations), or call controller.set_total_steps(N) before training."
)


class SRLoRA:
    """SRLoRA over a PEFT LoRA model.

    Building it performs, for every layer carrying ``config.adapter_name``: the SVD of
    the layer's effective weight ``W0 = W + s B A`` (``= W`` for a fresh LoRA), kept to
    the top ``min(r_target, m, n)`` triplets, and the PiSSA initialisation
    ``B, A <- top-r factors``, ``W <- W0 - s B A``. The model's output is unchanged.

    Args:
        model: a ``peft.PeftModel`` (or its ``LoraModel``); layer kinds: :mod:`srlora.kinds`.
        config: the SRLoRA hyper-parameters.
        svd_caches: precomputed SVDs by layer name (to reuse a decomposition); computed
            here when ``None``, on rank 0 and broadcast under ``torch.distributed``.
        run_model: with ``subspace_whiten``: runs the model on text it should keep knowing (:mod:`srlora.whiten`).
    """

    def __init__(
        self,
        model: nn.Module,
        config: SRLoRAConfig,
        svd_caches: Mapping[str, SVDCache] | None = None,
        run_model: Callable[[], object] | None = None,
    ):
        if not isinstance(config, SRLoRAConfig):
            raise TypeError(f"config must be an SRLoRAConfig, got {type(config).__name__}.")
        self.model, self.config = model, config
        self.global_step = 0
        self.skipped_steps = 0
        self.skipped_switches = 0
        self.history: list[SwitchEvent] = []
        self.optimizer_reset = OptimizerStateReset(config.optimizer_reset)
        self._optimizer: torch.optim.Optimizer | None = None
        self._hooks: list[Any] = []
        self._warned: set[str] = set()

        # Everything that can refuse the model or the config is checked before any weight changes.
        targets = find_lora_targets(model, config.adapter_name)
        budgets = {t.name: config.budget(t.r, min(t.shape)) for t in targets}
        for target in targets:
            cache = (svd_caches or {}).get(target.name)
            k, (m, n) = budgets[target.name].cached, target.shape
            if cache is not None and (cache.U.shape != (m, k) or cache.V.shape != (n, k)):
                raise ValueError(f"svd_caches[{target.name!r}] does not match the layer's shape ({m}x{n}, k={k}).")
        scheduled = config.total_steps != "auto" or config.switch_interval is not None
        total_steps = None if config.total_steps == "auto" else config.total_steps
        schedules = self._schedules(budgets, total_steps) if scheduled else None

        self._layers: dict[str, LayerState] = {}
        full_rows = policy_class(config).full_rows(config)
        for target in targets:
            cache = (svd_caches or {}).get(target.name)
            self._layers[target.name] = LayerState.create(target, budgets[target.name], config, cache, full_rows)

        collective.prepare()  # the group that checks that every rank makes a collective call
        self._groups, self._group_of = build_groups(list(self._layers.values()))  # batched switches

        warn_clamped(config, budgets, stacklevel=2)
        self.directions = policy_for(self._layers, config, run_model)  # what enters at a switch
        if schedules is not None:
            self._install_schedules(schedules, stacklevel=3)
        logger.info("SRLoRA: %d layers, its state %.1f MiB", len(self._layers), self.memory_bytes() / 2**20)

    def set_total_steps(self, total_steps: int) -> None:
        """Give ``N_all`` to a controller built with ``total_steps='auto'`` (the integrations do);
        with a fixed ``total_steps``, warn if the two differ (the configured schedule is kept)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}.")
        if self.config.total_steps == "auto":
            self._build_schedules(total_steps, stacklevel=3)
        elif self.config.total_steps is not None and self.config.total_steps != total_steps:
            warnings.warn(
                f"SRLoRAConfig.total_steps={self.config.total_steps}, but training runs {total_steps} optimizer "
                f"steps; the configured schedule is kept. Use total_steps='auto' to follow the trainer.",
                ScheduleWarning,
                stacklevel=2,
            )

    def _schedules(self, budgets: Mapping[str, SwitchBudget], total_steps: int | None) -> dict[str, SwitchSchedule]:
        """Every layer's schedule (raises, changing nothing, when one cannot be built)."""
        return {name: SwitchSchedule.build(b, total_steps, self.config.switch_interval) for name, b in budgets.items()}

    def _build_schedules(self, total_steps: int | None, stacklevel: int) -> None:
        budgets = {name: layer.budget for name, layer in self._layers.items()}
        self._install_schedules(self._schedules(budgets, total_steps), stacklevel + 1)

    def _install_schedules(self, schedules: Mapping[str, SwitchSchedule], stacklevel: int) -> None:
        config = self.config
        for name, layer in self._layers.items():
            layer.set_schedule(schedules[name], adaptive_trigger(config, schedules[name]))
        warn_short_interval(config, schedules.values(), stacklevel + 1)
        self.directions.update_windows(self.global_step + 1)

    # ------------------------------------------------------------------ queries
    @property
    def layers(self) -> Mapping[str, LayerState]:
        """``{layer name: LayerState}``, read-only."""
        return MappingProxyType(self._layers)

    layer_names = property(lambda self: list(self._layers), doc="The adapted layers' names, in order.")

    def switch_groups(self) -> list[list[str]]:
        """The layers that switch together (one batched operation: same kind and shape), by name;
        a layer that switches on its own (FSDP2, ZeRO, quantized) is a group of one."""
        return switch_groups(list(self._layers), self._group_of)

    def schedule(self, layer: str | None = None) -> SwitchSchedule:
        """The switch schedule of ``layer`` (default: the first layer)."""
        schedule = self._layers[layer or next(iter(self._layers))].schedule
        if schedule is None:
            raise RuntimeError(_NO_SCHEDULE)
        return schedule

    def pair_scores(self) -> dict[str, torch.Tensor]:
        """``{layer: S_k for k in 0..r-1}`` (float32, on the adapter's device)."""
        return {name: layer.pair_scores() for name, layer in self._layers.items()}

    def directions_used(self) -> dict[str, int]:
        """``{layer: p}``: how many directions have entered so far (``W0``'s singular directions,
        or the gradient's under ``direction_policy="gradient_subspace"``)."""
        return {name: layer.pointer for name, layer in self._layers.items()}

    def slot_directions(self) -> dict[str, list[int]]:
        """``{layer: direction held by each of the r slots}``."""
        return {name: layer.slot_direction.tolist() for name, layer in self._layers.items()}

    def svd_cache_bytes(self) -> int:
        return sum(layer.cache.nbytes for layer in self._layers.values())

    def memory_bytes(self, seen: set[int] | None = None) -> int:
        """Bytes of every tensor SRLoRA keeps beside the model and its optimizer (:mod:`.memory`)."""
        return owned_bytes(self, self.model, seen)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The LoRA ``A`` and ``B`` weights SRLoRA drives."""
        for layer in self._layers.values():
            yield layer.target.lora_A
            yield layer.target.lora_B

    # ------------------------------------------------------------------ training protocol
    def attach(self, optimizer: torch.optim.Optimizer) -> SRLoRA:
        """Hook ``optimizer``: importance before each ``step()``, the scheduled switch after it.

        A plain loop needs nothing else. Under gradient accumulation or a GradScaler the
        hooks run once per applied step, with the gradient that step applies (a step the
        scaler skips runs no hook). Returns ``self``.
        """
        if self._hooks:
            raise RuntimeError("SRLoRA is already attached to an optimizer; call detach() first.")
        inner = unwrap_optimizer(optimizer)
        self._bind(inner)
        kind = type(next(iter(self._layers.values())).target)
        custom = kind.step_hooks(optimizer, self._update_importance, self._after_applied_step)  # e.g. ZeRO-3
        self._hooks = custom or [
            inner.register_step_pre_hook(self._pre_step_hook),
            inner.register_step_post_hook(self._post_step_hook),
        ]
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks installed by :meth:`attach`."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._optimizer = None
        self.optimizer_reset.unbind()

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def update_importance(self) -> bool:
        """Update the importance EMAs from the current gradients (call between
        ``backward()`` and ``optimizer.step()``). Returns ``False`` when the step was
        skipped because a gradient is not finite."""
        self._refuse_if_attached("update_importance")
        return self._update_importance()

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> list[SwitchEvent]:
        """Count one optimizer step and run the switches scheduled for it (call after
        ``optimizer.step()``). Returns the switch events of this step."""
        self._refuse_if_attached("step")
        return self._after_step(optimizer)

    def switch(self, optimizer: torch.optim.Optimizer | None = None) -> list[SwitchEvent]:
        """Switch every layer that has unused directions left, now, whatever the schedule.

        ``optimizer`` (whose recycled moments are reset) must be the one SRLoRA is attached
        to, if it is attached."""
        self._use(optimizer)
        self._check_kinds()
        return self._switch(list(self._layers.values()))

    # ------------------------------------------------------------------ export
    def merge_and_unload(self) -> nn.Module:
        """The plain base model with ``W + s B A`` merged into every layer, same outputs (a
        quantized layer: a float32 ``nn.Linear`` of its dequantized weight plus its updates;
        FSDP2 / ZeRO-3: each rank merges what it holds, every rank calls it). Detaches the
        controller, which must not be used afterwards."""
        refuse(self._layers.values(), "merge_and_unload")
        collective.barrier("merge_and_unload")  # every rank, or a clear error before any collective
        unload = getattr(self.model, "unload", None)
        if unload is None:
            raise TypeError("merge_and_unload needs the PeftModel (or LoraModel) SRLoRA was built on.")
        self.detach()
        self.directions.close()
        from .export import merge_layers_

        merge_layers_(self.model, self.layers)  # each kind's own merge (sharded: each rank its rows)
        return unload()

    def export_lora(
        self, path: str | Path, rank: int | None = None, base: nn.Module | Mapping[str, torch.Tensor] | None = None
    ) -> dict[str, float]:
        """Write a standard PEFT LoRA adapter of the total update relative to the original
        weights (exact when ``rank`` is None); returns each layer's relative error. ``base``:
        the original model, needed under ``fused_records=False``. See
        :func:`srlora.export.export_lora`."""
        from .export import export_lora

        return export_lora(self.model, self.layers, self.config.adapter_name, path, rank, base)

    # ------------------------------------------------------------------ internals
    def _check_kinds(self) -> None:
        """Follow (or refuse) layers whose kind changed since SRLoRA was built, and group the
        layers again for their new kinds."""
        if check_build_order(self._layers.values(), pristine=self.global_step == 0 and not self.history):
            self._groups, self._group_of = build_groups(list(self._layers.values()))

    def _bind(self, optimizer: torch.optim.Optimizer) -> None:
        self._check_kinds()
        require_params(optimizer, {name: ly.target.optimizer_tensors() for name, ly in self._layers.items()})
        self._optimizer = optimizer
        self.optimizer_reset.bind(optimizer)

    def _use(self, optimizer: torch.optim.Optimizer | None) -> None:
        """Accept the optimizer a manual call passes: the bound one, or a first one to bind."""
        if optimizer is None:
            return
        optimizer = unwrap_optimizer(optimizer)
        if self._optimizer is None:
            self._bind(optimizer)
        elif optimizer is not self._optimizer:
            raise ValueError(
                f"SRLoRA is bound to another optimizer ({type(self._optimizer).__name__}) than the one passed "
                f"({type(optimizer).__name__}); a switch resets the moments of the optimizer that trains the "
                f"LoRA parameters. Pass that one, or call detach() before using another."
            )

    def _pre_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> Any:
        return run_before_step(self._update_importance, args, kwargs)

    def _post_step_hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._after_step(optimizer)

    def _after_applied_step(self, skipped: bool) -> None:
        if not skipped:  # a step the loss scaler skipped changed nothing: not counted
            self._after_step(self._optimizer)

    def _refuse_if_attached(self, name: str) -> None:
        if self._hooks:
            raise RuntimeError(
                f"SRLoRA is attached to an optimizer, which already calls {name}() on every step; "
                f"remove the manual call (or call detach() to drive SRLoRA by hand)."
            )

    def _warn_once(self, key: str, message: str, category: type[Warning], stacklevel: int) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, category, stacklevel=stacklevel + 1)

    @torch.no_grad()
    def _update_importance(self) -> bool:
        layers = [ly for ly in self._layers.values() if ly.target.has_grad()]
        if not layers:
            return False
        if self.global_step == 0 and self._optimizer is None:
            self._check_kinds()  # the manual protocol binds the optimizer only after this
        if not update_importance_from_targets_([ly.importance for ly in layers], [ly.target for ly in layers]):
            self.directions.discard()
            self.skipped_steps += 1
            self._warn_once(
                "nonfinite",
                "Non-finite gradients in the LoRA parameters: this step's importance update was skipped "
                "(counted in SRLoRA.skipped_steps; warned once).",
                NonFiniteWarning,
                stacklevel=4,
            )
            return False
        self.directions.fold()
        if self.optimizer_reset.pending:
            self.optimizer_reset.before_step({name: layer.target for name, layer in self._layers.items()})
        return True

    def _after_step(self, optimizer: torch.optim.Optimizer | None) -> list[SwitchEvent]:
        # The manual protocol learns the optimizer here; "seed" needs it before the next step.
        self._use(optimizer)
        self.global_step += 1
        if any(layer.schedule is None for layer in self._layers.values()):
            raise RuntimeError(_NO_SCHEDULE)
        if self.config.adaptive_switch:
            due = adaptive_due(list(self._layers.values()), self.global_step, self._group_of)
        else:
            due = [layer for layer in self._layers.values() if layer.schedule.is_switch_step(self.global_step)]  # type: ignore[union-attr]
        events = self._switch(due) if due else []
        self.directions.update_windows(self.global_step + 1)
        return events

    @torch.no_grad()
    def _switch(self, layers: list[LayerState]) -> list[SwitchEvent]:
        events: list[SwitchEvent] = []
        reset_all = self.config.reset_scores == "all"
        for layer in mark_exhausted(layers):
            message = f"Layer {layer.name!r} has used all {layer.limit} of its singular directions "
            message += "(r_target clamped to min(m, n) or reached); it stops switching."
            warnings.warn(message, DirectionsExhaustedWarning, stacklevel=3)
        layers = [layer for layer in layers if layer.can_switch]
        # One device-to-host transfer for every switching layer (not a few per layer).
        scores, finite, host = switch_inputs(layers, self._group_of, self.directions.host_reads(layers))
        planned: list[tuple[LayerState, SwitchEvent]] = []
        for layer, layer_scores, ok, reads in zip(layers, scores, finite, host, strict=True):
            if not ok:
                # Fusing a diverged pair would write NaN/inf into the frozen weight for good.
                self.skipped_switches += 1
                self._warn_once(
                    "nonfinite-pairs",
                    f"Layer {layer.name!r} has non-finite LoRA weights (the optimizer diverged): its switch was "
                    f"skipped so that they are not fused into the frozen weight (counted in "
                    f"SRLoRA.skipped_switches; warned once).",
                    NonFiniteWarning,
                    stacklevel=3,
                )
                continue
            directions = self.directions.choose(layer, reads)
            planned.append((layer, layer.plan(self.global_step, layer_scores, directions)))
        vectors = self.directions.vectors([layer for layer, _ in planned])
        apply_switches(planned, self._group_of, reset_all, self.optimizer_reset, vectors)
        for layer, event in planned:
            layer.commit(event)
            self.directions.switched(layer.name)
            events.append(event)
        self.history.extend(events)
        return events

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the method exactly (the SVD is recomputed)."""
        return {
            "config": self.config.to_dict(),
            "global_step": self.global_step,
            "skipped_steps": self.skipped_steps,
            "skipped_switches": self.skipped_switches,
            "history": [event.to_dict() for event in self.history],
            "layers": {name: layer.state_dict() for name, layer in self._layers.items()},
            "optimizer_reset": self.optimizer_reset.state_dict(),
            "directions": self.directions.state_dict(),
            "warned": sorted(self._warned),
            "rank": collective.rank_stamp(is_sharded_model([la.target for la in self._layers.values()])),
        }

    def check_state_dict(self, state: dict[str, Any]) -> None:
        """Raise :class:`~srlora.errors.CheckpointError`, changing nothing, when ``state`` was
        not saved by a controller built like this one (layers, config, base weights, shapes)."""
        if not isinstance(state, dict) or not {"config", "layers", "global_step", "history"} <= set(state):
            raise CheckpointError("not an SRLoRA controller state (no config/layers/global_step/history).")
        saved = set(state["layers"])
        if saved != set(self._layers):
            missing, extra = sorted(set(self._layers) - saved), sorted(saved - set(self._layers))
            raise CheckpointError(
                f"SRLoRA state does not match this model's layers (missing {missing[:4]}, unexpected {extra[:4]}); "
                f"build the model and SRLoRA the same way as the run that saved it."
            )
        try:
            saved_config = SRLoRAConfig.from_dict(state["config"])
        except (TypeError, ValueError) as exc:
            raise CheckpointError(f"SRLoRA state holds an invalid config: {exc}") from exc
        # svd_device only places the cache; a state with records loads into a controller without
        # them (W holds the pairs), and each layer refuses the other way round
        differ = saved_config.differences(self.config, ignore=("svd_device", "fused_records"))
        if differ:
            raise CheckpointError(
                f"SRLoRA state was saved with another config: {', '.join(differ)}; build SRLoRA with the config "
                f"of the run that saved it."
            )
        collective.check_rank_stamp(state.get("rank"), is_sharded_model([la.target for la in self._layers.values()]))
        for name, layer in self._layers.items():
            layer.check_state(state["layers"][name])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; checked whole first (:meth:`check_state_dict`)."""
        self.check_state_dict(state)
        for name, layer in self._layers.items():
            layer.load_state_dict(state["layers"][name])
        self.optimizer_reset.load_state_dict(state["optimizer_reset"])
        self.directions.load_state_dict(state["directions"])
        self.global_step = int(state["global_step"])
        self.skipped_steps = int(state["skipped_steps"])
        self.skipped_switches = int(state.get("skipped_switches", 0))
        self.history = [SwitchEvent.from_dict(d) for d in state["history"]]
        self._warned = set(state.get("warned", []))
