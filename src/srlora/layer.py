"""One adapted layer under SRLoRA: its state and the operations that change it.

A :class:`LayerState` owns, for one PEFT LoRA layer (``y = x W^T + s x A^T B^T``,
``W: (m, n)``, ``A: (r, n)``, ``B: (m, r)``):

* the SVD cache of its pretrained weight ``W0 ~= U diag(S) V^T`` (top ``k`` directions);
* the pair importance EMAs (:class:`~srlora.importance.PairImportance`);
* which singular direction of ``W0`` each of the ``r`` slots holds, and the pointer
  ``p`` to the next unused one;
* the record of the fused pairs ``F_B (m, p - r)``, ``F_A (p - r, n)``
  (:class:`~srlora.record.FusedRecord`) and that of the ``p`` pairs that entered the slots
  ``E_B (m, p)``, ``E_A (p, n)``, with which the total update relative to ``W0`` is exactly::

      W_t + s B A - W0 = s F_B F_A + s B A - s E_B E_A                          (rank <= 2p)

  Under the paper's entries ``s E_B E_A = U[:, :p] diag(S[:p]) V[:, :p]^T`` (the directions
  used), read from the SVD cache, and ``E`` is not kept; it is kept where the entries are
  not the cache's (``entry_scale``, ``direction_policy="gradient_subspace"``) or where the
  kind needs it (a quantized base's side factors). Under ``fused_records=False`` neither
  record is kept (``W`` holds the fused pairs; the update is then read against ``W0``);

* its switch schedule (and, under ``adaptive_switch``, its trigger).

The controller decides *when* a layer switches; the layer decides *which* pairs and
directions and keeps the books; the layer's kind (``target``, :mod:`srlora.kinds`) does
what depends on where the tensors live: reading the weight, the writes of the
initialisation and of the switch, and the side state a quantized base needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

from .config import SRLoRAConfig, SwitchBudget
from .errors import CheckpointError
from .events import SwitchEvent
from .importance import PairImportance
from .record import FusedRecord
from .schedule import AdaptiveTrigger, SwitchSchedule
from .svd import SVDCache, distributed_top_triplets, factor_difference
from .targets import LoraTarget, current_kind, fingerprint, same_fingerprint


class LayerState:
    """SRLoRA's state of one adapted layer, and the switch that changes it.

    Args:
        target: the PEFT LoRA layer (already PiSSA-initialised from ``cache``).
        cache: the top ``budget.cached`` singular triplets of its ``W0``.
        budget: ``r``, ``r'`` and how many directions the layer may use.
        config: the run's config (EMA coefficients, where new pairs come from, their scale).
        fingerprint: :func:`~srlora.targets.fingerprint` of the layer's weight ``W0`` (and bias)
            before the PiSSA initialisation: a checkpoint of another base model is refused.
    """

    def __init__(
        self,
        target: LoraTarget,
        cache: SVDCache,
        budget: SwitchBudget,
        config: SRLoRAConfig,
        fingerprint: list[float] | None = None,
        full_rows: bool = False,
    ) -> None:
        expected = budget.cached
        if cache.rank != expected:
            raise ValueError(f"layer {target.name!r}: SVD cache of rank {cache.rank}, expected {expected}.")
        self.target = target
        self.fingerprint = fingerprint
        self.cache = cache
        self.budget = budget
        m, n = target.shape
        w0, w1 = target.row_span
        self.importance = PairImportance(
            budget.r, m, n, config.beta1, config.beta2, target.device, pair_span=target.pair_span, rows_held=w1 - w0
        )
        # The singular value every new pair enters with (None: its own W0 direction's).
        self.entry_sigma = config.entry_sigma(cache.S[: budget.r])
        self.keeps_records = config.fused_records
        if not self.keeps_records and target.records_entries:
            raise ValueError(
                f"layer {target.name!r} ({target.kind}): its fused pairs are its side factors (the base weight is "
                f"never written), so they cannot be dropped: keep fused_records=True."
            )
        self.keeps_entries = self.keeps_records and (config.records_entries or target.records_entries)
        # Host bookkeeping in plain Python (a switch's decisions cost no tensor op): the
        # direction each slot holds, which of the layer's directions have entered so far (a
        # prefix under the paper's policy; any set under direction_policy="gradient"), and
        # how many: p.
        self._slots: list[int] = list(range(budget.r))
        self._used: list[bool] = [k < budget.r for k in range(budget.directions)]
        self.pointer = budget.r
        self.record = self._new_record()
        self.entered = self._new_entered() if self.keeps_entries else None
        self.full_rows = full_rows  # the cache keeps every row of U (the gradient policy needs them)
        self.layout = (target.row_span, target.pair_span)  # the rows of W / B and of A the state holds
        self.exhausted = False
        target.bind(self.record, self.entered)  # a quantized base sets up its side factors here
        self.schedule: SwitchSchedule | None = None
        self.trigger: AdaptiveTrigger | None = None
        # A trigger state restored before the trigger exists (total_steps="auto": a
        # framework may restore a checkpoint before it supplies the step count).
        self._trigger_state: dict[str, Any] | None = None

    @classmethod
    def create(
        cls,
        target: LoraTarget,
        budget: SwitchBudget,
        config: SRLoRAConfig,
        cache: SVDCache | None = None,
        full_rows: bool = False,
    ) -> LayerState:
        """Fingerprint the layer's weight ``W0 = W + s B A``, decompose it (unless ``cache`` is
        given; on rank 0 and broadcast under torch.distributed), and PiSSA-initialise it
        (unless ``config.first_pairs`` keeps PEFT's start).
        ``full_rows``: the cache keeps every row of ``U`` (the direction policy needs them)."""
        target.setup(config)
        with target.whole(modify=True):  # ZeRO-3: the whole layer on every rank; rank 0's writes kept
            w_eff = target.effective_weight()
            print_ = fingerprint(w_eff, target.bias)
            if cache is None:
                cache = distributed_top_triplets(w_eff, budget.cached, config)
            del w_eff
            cache = target.prepare_cache(cache, full_rows=full_rows)
            if config.svd_device is not None:
                cache = cache.to(config.svd_device)
            if config.first_pairs == "pissa":
                target.pissa_init_(cache)  # else the slots keep PEFT's start (B = 0): nothing changes
        return cls(target, cache, budget, config, print_, full_rows)

    def _new_record(self) -> FusedRecord | None:
        """The (empty) record of fused pairs, room for every one; ``None`` under ``fused_records=False``."""
        return self.target.new_record(self.budget.directions - self.budget.r) if self.keeps_records else None

    def _new_entered(self) -> FusedRecord:
        """The record of the pairs that entered the slots, starting with the first ``r``."""
        entered = self.target.new_record(self.budget.directions)
        with self.target.whole(modify=False):
            entered.append_(*self.target.slot_factors(torch.arange(self.r)))
        return entered

    @property
    def side_factor_bytes(self) -> int:
        """Memory the layer's kind keeps beyond the common state (a quantized base's side factors)."""
        return self.target.extra_bytes()

    @property
    def fused_B(self) -> torch.Tensor:
        """``F_B (rows, p - r)``: the ``B`` columns of the pairs fused so far."""
        return self._kept_record().B

    @property
    def fused_A(self) -> torch.Tensor:
        """``F_A (p - r, n)``: the ``A`` rows of the pairs fused so far."""
        return self._kept_record().A

    def _kept_record(self) -> FusedRecord:
        if self.record is None:
            raise ValueError(
                f"layer {self.name!r} keeps no record of its fused pairs (fused_records=False); W holds them."
            )
        return self.record

    # ------------------------------------------------------------------ queries
    @property
    def name(self) -> str:
        return self.target.name

    @property
    def r(self) -> int:
        return self.budget.r

    @property
    def r_prime(self) -> int:
        return self.budget.r_prime

    @property
    def limit(self) -> int:
        """Directions this layer may use: ``min(r_target, m, n)``."""
        return self.budget.directions

    @property
    def can_switch(self) -> bool:
        """Unused directions are left for one more switch."""
        return self.pointer + self.r_prime <= self.limit

    @property
    def switches_done(self) -> int:
        return (self.pointer - self.r) // self.r_prime

    @property
    def has_switched(self) -> bool:
        """The frozen weight differs from the one the PiSSA initialisation left."""
        return self.pointer > self.r

    @property
    def slot_direction(self) -> torch.Tensor:
        """``(r,)`` long: the singular direction of ``W0`` each slot holds."""
        return torch.tensor(self._slots, dtype=torch.long)

    @property
    def used(self) -> torch.Tensor:
        """``(limit,)`` bool: the directions that have entered so far."""
        return torch.tensor(self._used, dtype=torch.bool)

    def use_cache(self, cache: SVDCache) -> None:
        """Keep the SVD cache in ``cache`` (views into a group's stacked storage, holding the
        same values) from now on."""
        if cache.U.shape != self.cache.U.shape or cache.V.shape != self.cache.V.shape:
            raise ValueError(f"layer {self.name!r}: the new cache's shapes do not fit.")
        self.cache = cache

    def retarget(self, target: LoraTarget) -> None:
        """Drive the same layer through another kind (see :func:`~srlora.targets.current_kind`):
        the state stays as it is when its layout is the same; before the first switch and the
        first importance update it is laid out again for the rows the new kind holds."""
        if target.module is not self.target.module:
            raise ValueError(f"layer {self.name!r}: cannot retarget to {target!r}.")
        if (target.row_span, target.pair_span) != self.layout:
            if self.has_switched:
                raise ValueError(f"layer {self.name!r} has switched: its state cannot be laid out again.")
            m, n = target.shape
            w0, w1 = target.row_span
            old = self.importance
            self.importance = PairImportance(
                self.r, m, n, old.beta1, old.beta2, target.device, pair_span=target.pair_span, rows_held=w1 - w0
            )
            self.cache = target.prepare_cache(self.cache, full_rows=self.full_rows)
            self.target = target
            self.record = self._new_record()
            self.entered = self._new_entered() if self.keeps_entries else None
            target.bind(self.record, self.entered)
            self.layout = (target.row_span, target.pair_span)
        self.target = target

    def in_capture_window(self, next_step: int, window: int, adaptive: bool) -> bool:
        """Optimizer step ``next_step`` lies in the ``window`` steps before this layer's next
        switch, and a switch is left (:meth:`~srlora.schedule.SwitchSchedule.in_window`)."""
        schedule = self.schedule
        return (
            schedule is not None
            and self.can_switch
            and schedule.in_window(next_step, self.switches_done, window, adaptive)
        )

    def set_schedule(self, schedule: SwitchSchedule, trigger: AdaptiveTrigger | None = None) -> None:
        self.schedule = schedule
        self.trigger = trigger
        if trigger is not None and self._trigger_state is not None:
            trigger.load_state_dict(self._trigger_state)

    def pair_scores(self) -> torch.Tensor:
        """``S_k`` (float32, ``(r,)``, on the adapter's device); under FSDP2 the sum of every
        rank's share (a collective: all ranks call it together)."""
        scores = self.importance.pair_scores()
        return self.target.reduce_(scores) if self.importance.partial else scores

    def lowest_pairs(self, scores: Sequence[float]) -> list[int]:
        """The ``r'`` lowest-scoring slots in ascending order (ties go to the lowest index)."""
        order = sorted(range(self.r), key=lambda k: scores[k])  # a stable sort
        return sorted(order[: self.r_prime])

    def unused_directions(self) -> torch.Tensor:
        """Indices of the directions that have not entered yet, ascending."""
        return torch.tensor([k for k, u in enumerate(self._used) if not u], dtype=torch.long)

    # ------------------------------------------------------------------ the switch
    def plan(self, step: int, scores: Sequence[float], directions: Sequence[int] | None = None) -> SwitchEvent:
        """The switch this layer would make now, in plain Python: the ``r'`` lowest-scoring
        slots, and the directions they receive (default: the next unused ones). Changes nothing;
        the tensor side is its group's (:meth:`~srlora.switch.LayerGroup.apply`), the
        books are :meth:`commit`'s.

        Raises ``RuntimeError`` when no direction is left (check :attr:`can_switch`) and
        ``ValueError`` for ``directions`` that are not ``r'`` distinct unused ones."""
        if not self.can_switch:
            raise RuntimeError(f"layer {self.name!r} has no unused direction left ({self.pointer} of {self.limit}).")
        if directions is None:
            directions = [k for k, u in enumerate(self._used) if not u][: self.r_prime]
        chosen = sorted(int(d) for d in directions)
        if (
            len(chosen) != self.r_prime
            or len(set(chosen)) != self.r_prime
            or not all(0 <= d < self.limit for d in chosen)
            or any(self._used[d] for d in chosen)
        ):
            raise ValueError(f"layer {self.name!r}: {chosen} are not {self.r_prime} distinct unused directions.")
        slots = self.lowest_pairs(scores)
        return SwitchEvent(
            step=step,
            layer=self.name,
            slots=tuple(slots),
            directions=tuple(chosen),
            evicted=tuple(self._slots[k] for k in slots),
            scores=tuple(float(scores[k]) for k in slots),
        )

    def commit(self, event: SwitchEvent) -> None:
        """The host bookkeeping of ``event`` (plain Python): pointer, slots, used directions."""
        self.pointer += self.r_prime
        for slot, direction in zip(event.slots, event.directions, strict=True):
            self._slots[slot] = direction
            self._used[direction] = True
        if self.trigger is not None:
            self.trigger.switched()

    @torch.no_grad()
    def total_update_factors(self, base_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P (m, k), Q (k, n))`` with ``P Q = W_t + s B A - W0`` (float32, ``k <= 2p``), from
        the records of fused and entered pairs (or the SVD cache); ``W0`` itself is never kept.

        Under ``fused_records=False``: from ``base_weight`` (``W0``, whole, as the module stores
        it; checked against the layer's fingerprint), ``D = (W_t + s B A) - W0`` factored at its
        rank (at most ``2p``), exact up to the rounding ``W_t`` carries. Every process calls it."""
        if self.record is not None:
            return self.target.total_update_factors(self.cache, self.used, self.record, self.entered)
        if base_weight is None:
            raise ValueError(
                f"layer {self.name!r} keeps no record of its fused pairs (fused_records=False): its total update "
                f"needs the pretrained weight W0, e.g. export_lora(..., base=<the original model>)."
            )
        with self.target.whole(modify=False):
            now = self.target.effective_weight()
            base_weight = base_weight.T if self.target.fan_in_fan_out else base_weight  # stored (n, m)
            if tuple(base_weight.shape) != tuple(now.shape):
                raise ValueError(
                    f"layer {self.name!r}: the base weight has shape {tuple(base_weight.shape)}, the layer "
                    f"{tuple(now.shape)}."
                )
            w0 = base_weight.detach().to(now.device, torch.float32)
            if self.fingerprint is not None and not same_fingerprint(
                fingerprint(w0, self.target.bias), self.fingerprint
            ):
                raise ValueError(
                    f"layer {self.name!r}: the base weight given is not the pretrained weight this layer was "
                    f"built from; pass the original model (the same checkpoint the run started from)."
                )
            return factor_difference(now - w0, max_rank=2 * self.pointer)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "pointer": self.pointer,
            "slot_direction": self.slot_direction,
            "used": self.used,
            **({} if self.record is None else self.record.state_dict()),
            **({} if self.entered is None else self.entered.state_dict("entered")),
            "exhausted": self.exhausted,
            "importance": self.importance.state_dict(),
            "trigger": None if self.trigger is None else self.trigger.state_dict(),
            "fingerprint": self.fingerprint,
            **self.target.state_dict(),
        }

    def check_state(self, state: dict[str, Any]) -> None:
        """Raise :class:`~srlora.errors.CheckpointError` (changing nothing) when ``state`` does
        not fit this layer: another base weight, rank, budget or shape."""
        name = self.name
        saved_print = state.get("fingerprint")
        known = self.fingerprint is not None and saved_print is not None
        if known and not same_fingerprint(saved_print, self.fingerprint):  # type: ignore[arg-type]
            raise CheckpointError(
                f"layer {name!r}: the pretrained weight differs from the one the state was saved from; "
                f"build the model from the same base weights as the run that saved it."
            )
        slots = state["slot_direction"]
        if tuple(slots.shape) != (self.r,):
            raise CheckpointError(f"layer {name!r}: saved with r={slots.numel()}, the model has r={self.r}.")
        pointer = int(state["pointer"])
        used = pointer - self.r
        if not self.r <= pointer <= self.limit or (pointer - self.r) % self.r_prime:
            raise CheckpointError(
                f"layer {name!r}: saved pointer {pointer} does not fit r={self.r}, r'={self.r_prime} and "
                f"{self.limit} directions; build SRLoRA with the config of the run that saved it."
            )
        used_mask = state["used"]
        if tuple(used_mask.shape) != (self.limit,) or int(used_mask.sum()) != pointer:
            raise CheckpointError(
                f"layer {name!r}: the saved set of used directions does not fit {self.limit} of them."
            )
        if self.record is not None:
            if "fused_B" not in state:
                raise CheckpointError(
                    f"layer {name!r}: the state was saved with fused_records=False (no record of the fused pairs); "
                    f"build SRLoRA with fused_records=False to load it."
                )
            self.record.check_state(state, used, f"layer {name!r}")
        if self.entered is not None:
            self.entered.check_state(state, pointer, f"layer {name!r}", prefix="entered")
        self.target.check_state(state, pointer)
        for key, own in zip(("ibar_A", "ubar_A", "ibar_B", "ubar_B"), self.importance.tensors(), strict=True):
            saved = state["importance"][key]
            if saved.shape != own.shape:
                raise CheckpointError(
                    f"layer {name!r}: importance {key} has shape {tuple(saved.shape)}, expected {tuple(own.shape)}."
                )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.check_state(state)
        pointer = int(state["pointer"])
        self.pointer = pointer
        self._slots = [int(x) for x in state["slot_direction"].tolist()]
        self._used = [bool(x) for x in state["used"].tolist()]
        if self.record is not None:  # a state with records loads into a layer without them: W holds the pairs
            self.record.load_state_dict(state)
        if self.entered is not None:
            self.entered.load_state_dict(state, prefix="entered")
        self.exhausted = bool(state["exhausted"])
        self.importance.load_state_dict(state["importance"])
        self.target.load_state_dict(state, pointer)
        self._trigger_state = state.get("trigger")
        if self.trigger is not None and self._trigger_state is not None:
            self.trigger.load_state_dict(self._trigger_state)


def check_build_order(layers: Iterable[LayerState], pristine: bool = False) -> bool:
    """Follow layers whose kind changed since SRLoRA was built where SRLoRA's state can
    follow (:func:`~srlora.targets.current_kind`; ``pristine``: nothing trained or switched
    yet); refuse the others before anything changes. Returns whether some layer changed kind."""
    layers = list(layers)
    moved = {layer.name: new for layer in layers if (new := current_kind(layer.target)) is not None}
    split = [name for layer in layers if (new := moved.get(name := layer.name)) and layer.layout != _layout(new)]
    if split and not pristine:
        raise RuntimeError(
            f"{len(split)} adapted layer(s) (e.g. {split[0]!r}) were sharded by fully_shard after SRLoRA had trained "
            f"or switched on them whole. Build it after sharding: get_peft_model -> fully_shard (each block, then "
            f"the root) -> SRLoRA(model, config) -> optimizer -> attach (or before it, attached before the first step)."
        )
    for layer in layers:
        if layer.name in moved:
            layer.retarget(moved[layer.name])
    return bool(moved)


def _layout(target: LoraTarget) -> tuple[tuple[int, int], tuple[int, int]]:
    return target.row_span, target.pair_span


def refuse(layers: Iterable[LayerState], what: str) -> None:
    """Raise ``NotImplementedError`` with the way out when a layer's kind cannot take part in
    ``what`` (:meth:`~srlora.kinds.base.LoraTarget.refusal`)."""
    for layer in layers:
        reason = layer.target.refusal(what)
        if reason is not None:
            raise NotImplementedError(reason)
