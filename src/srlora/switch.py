"""The switch: fuse the least important pairs into ``W`` and re-initialise their slots, for a
batch of layers at once (a layer that switches on its own is a batch of one).

A switch is a handful of small operations per layer (gather the slots, two rank-``r'``
products, the weight update, the factor writes, the record, the importance reset, the
optimizer's moments). Looping over layers would make its cost grow with their number, not
with the work. A :class:`LayerGroup` holds layers whose kind can switch them together
(:meth:`~srlora.kinds.base.LoraTarget.batch_key`: same shape, rank, ``r'``, dtypes and
device), or one layer whose kind cannot (FSDP2 shards, ZeRO partitions, quantized bases),
and keeps their SVD caches, importance EMAs and records *stacked*, each
:class:`~srlora.layer.LayerState` holding views of its row, so that for the ``L``
layers of a group::

    U (L, rows, k), S (L, k), V (L, n, k)                     the SVD caches
    I_bar_A, U_bar_A (L, pairs held, n), I_bar_B, U_bar_B (L, rows held, r)   the importance EMAs
    F_B^T (L, cap, rows held), F_A (L, cap, n)               the fused records (and the entered)

and one switch of any of its layers is a fixed number of batched operations: gather the new
directions (``U[l, :, d]``...), the kind's writes (:meth:`~srlora.kinds.base.LoraTarget.switch_batched_`:
one batched product for a dense group, the layer's own write for the others), one indexed
write into each record, one masked product per EMA, and the optimizer's moments
(:meth:`~srlora.optim_state.OptimizerStateReset.on_switch`). Each layer still decides its own
switch (:meth:`LayerState.plan`, plain Python) and keeps its own books
(:meth:`LayerState.commit`); the group does the tensor side.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch

from .devices import to_device
from .layer import LayerState, SwitchEvent
from .optim_state import OptimizerStateReset
from .record import FusedRecord
from .svd import SVDCache

# The batched weight update materialises (L, m, n) float32 deltas: groups are cut into
# chunks of at most this many elements (256 MiB), so a 7B model's 4096 x 11008 layers go
# a few at a time.
CHUNK_ELEMENTS = 1 << 26


class _StackedRecords:
    """The records (fused, or entered) of a group's layers in one stacked storage
    ``Bt (L, cap, rows)``, ``A (L, cap, n)``; each record keeps views of its row."""

    def __init__(self, records: Sequence[FusedRecord]) -> None:
        self.records = list(records)
        self._stack(min(rec.capacity for rec in self.records))

    def _stack(self, capacity: int) -> None:
        """Stack the records' current values with room for ``capacity`` pairs each."""
        rows, n, dtype = self.records[0].rows, self.records[0].n, self.records[0].dtype
        device = self.records[0].storage()[1].device
        L = len(self.records)
        self.Bt = torch.zeros(L, capacity, rows, dtype=dtype, device=device)
        self.A = torch.zeros(L, capacity, n, dtype=dtype, device=device)
        for i, rec in enumerate(self.records):
            Bt, A = rec.storage()
            self.Bt[i, : min(capacity, Bt.shape[0])] = Bt[:capacity]
            self.A[i, : min(capacity, A.shape[0])] = A[:capacity]
            rec.use_storage(self.Bt[i], self.A[i])

    def write(self, sel: torch.Tensor, B_new: torch.Tensor, A_new: torch.Tensor, rows: Sequence[int]) -> None:
        """Write pairs ``B_new (L', rows, r')``, ``A_new (L', r', n)`` into the next ``r'``
        places of the records ``rows`` (``sel``: the same on the storage's device): one indexed
        write each. A record that grows as it goes (nothing allocated up front), or whose
        storage a checkpoint replaced, is stacked again first."""
        records = [self.records[i] for i in rows]
        r_prime = int(A_new.shape[1])
        need = max(rec.count for rec in records) + r_prime
        row_bytes = self.A.stride(0) * self.A.element_size()  # where row i starts (no tensor op)
        start = self.A.data_ptr()
        moved = any(rec.storage()[1].data_ptr() != start + i * row_bytes for i, rec in enumerate(self.records))
        if need > self.A.shape[1] or moved:
            self._stack(max(need, min(rec.capacity for rec in self.records)))
        pos = to_device(torch.tensor([[rec.count + j for j in range(r_prime)] for rec in records]), self.A.device)
        self.Bt[sel[:, None], pos] = B_new.transpose(1, 2).to(self.Bt.dtype)
        self.A[sel[:, None], pos] = A_new.to(self.A.dtype)
        for rec in records:
            rec.counted(r_prime)


def _stacked(records: Sequence[FusedRecord | None]) -> _StackedRecords | None:
    """The group's stacked records, or ``None`` where its layers keep none."""
    kept = [rec for rec in records if rec is not None]
    return _StackedRecords(kept) if kept and len(kept) == len(records) else None


class LayerGroup:
    """Layers that switch together (see the module doc): several of one batchable kind and
    shape, or one.

    Args:
        layers: the layers, in the controller's order; their caches, EMAs and records move
            into stacked storage here (same values, the layers keep views).
    """

    def __init__(self, layers: Sequence[LayerState]) -> None:
        if not layers:
            raise ValueError("a LayerGroup needs at least one layer.")
        self.layers = list(layers)
        self.position = {layer.name: i for i, layer in enumerate(self.layers)}
        first = self.layers[0]
        self.r, self.r_prime = first.r, first.r_prime
        self.device = first.target.device
        self.kind = type(first.target)
        self.row_span, self.pair_span = first.target.row_span, first.target.pair_span
        caches = [layer.cache for layer in self.layers]
        self.row_offset = caches[0].row_offset
        self.U = torch.stack([c.U for c in caches])
        self.S = torch.stack([c.S for c in caches])
        self.V = torch.stack([c.V for c in caches])
        ema = [torch.stack([layer.importance.tensors()[j] for layer in self.layers]) for j in range(4)]
        self.ibar_A, self.ubar_A, self.ibar_B, self.ubar_B = ema
        for i, layer in enumerate(self.layers):
            layer.use_cache(SVDCache(self.U[i], self.S[i], self.V[i], caches[i].row_offset))
            layer.importance.use_storage(*(t[i] for t in ema))
        self.fused, self.entered = (
            _stacked([layer.record for layer in self.layers]),
            _stacked([layer.entered for layer in self.layers]),
        )
        self.scaling = torch.tensor([layer.target.scaling for layer in self.layers], device=self.device)
        sigma = [layer.entry_sigma for layer in self.layers]
        self.entry_sigma = None if sigma[0] is None else torch.tensor(sigma, device=self.device)
        m, n = first.target.shape
        self.chunk = max(1, CHUNK_ELEMENTS // (m * n))

    def __len__(self) -> int:
        return len(self.layers)

    @property
    def names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def pair_scores(self) -> torch.Tensor:
        """``S_k`` of every layer, ``(L, r)`` float32, in a few batched operations (a layer whose
        importance is split among processes: this process's share, which they sum)."""
        if len(self.layers) == 1 and self.layers[0].importance.partial:
            return self.layers[0].importance.partial_scores()[None]
        score_A = (self.ibar_A * self.ubar_A).mean(dim=2)
        return score_A.add_((self.ibar_B * self.ubar_B).mean(dim=1))

    @torch.no_grad()
    def apply(
        self,
        events: Sequence[SwitchEvent],
        reset_all_scores: bool,
        optimizer_reset: OptimizerStateReset,
        vectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """The tensor side of ``events`` (planned by the group's layers, at most one each):
        the kind's writes, the records, the importance reset, the moments. ``vectors``: each
        layer's new pairs ``(U (m, r'), V (n, r'))`` where they do not come from the cache."""
        for start in range(0, len(events), self.chunk):
            self._apply(events[start : start + self.chunk], reset_all_scores, optimizer_reset, vectors)

    def _new_pairs(
        self, events: Sequence[SwitchEvent], sel: torch.Tensor, vectors: Mapping[str, tuple] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What enters the slots: ``(U_new (L', r', rows held), S_new (L', r'), V_new (L', r', n))``
        in float32 on the group's device, unit vectors, so that a slot receives ``s B_new A_new =
        u sigma v^T``: the given vectors, or ``W0``'s directions gathered from the stacked caches;
        with the layers' entry singular value where they have one."""
        w0, w1 = self.row_span
        if vectors is not None:
            U_new = torch.stack([vectors[e.layer][0][w0:w1] for e in events]).transpose(1, 2).to(self.device).float()
            V_new = torch.stack([vectors[e.layer][1] for e in events]).transpose(1, 2).to(self.device).float()
            S_new = U_new.new_ones(U_new.shape[:2])
        else:
            if max(max(e.directions) for e in events) >= self.U.shape[2]:
                raise ValueError(
                    f"layer {events[0].layer!r}: directions beyond the SVD cache; under direction_policy="
                    f"'gradient_subspace' the new pairs' vectors come from the policy's sketch."
                )
            directions = torch.tensor([e.directions for e in events], dtype=torch.long)
            where = self.U.device
            sel_c, dir_c = to_device(sel, where)[:, None], to_device(directions, where)
            U_new = to_device(self.U[sel_c, :, dir_c], self.device)
            if self.U.shape[1] != w1 - w0:  # the cache holds more rows than this process's
                U_new = U_new[:, :, w0 - self.row_offset : w1 - self.row_offset]
            S_new = to_device(self.S[sel_c, dir_c], self.device)
            V_new = to_device(self.V[sel_c, :, dir_c], self.device)
        if self.entry_sigma is not None:
            S_new = self.entry_sigma[to_device(sel, self.device)][:, None].expand(-1, self.r_prime).contiguous()
        return U_new, S_new, V_new

    def _apply(
        self,
        events: Sequence[SwitchEvent],
        reset_all_scores: bool,
        optimizer_reset: OptimizerStateReset,
        vectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
        rows = [self.position[e.layer] for e in events]
        layers = [self.layers[i] for i in rows]
        whole = rows == list(range(len(self.layers)))
        slots = torch.tensor([e.slots for e in events], dtype=torch.long)  # on the host
        sel = torch.tensor(rows, dtype=torch.long)
        U_new, S_new, V_new = self._new_pairs(events, sel, vectors)
        sel_d = to_device(sel, self.device)
        scaling = self.scaling if whole else self.scaling[sel_d]
        targets = [layer.target for layer in layers]
        B_old, A_old, B_new, A_new = self.kind.switch_batched_(targets, U_new, S_new, V_new, slots, scaling)
        # The records: each layer's next r' places (of the fused pairs, and of the entered ones).
        for records, B, A in ((self.fused, B_old, A_old), (self.entered, B_new, A_new)):
            if records is not None:  # none kept under fused_records=False (W holds the pairs)
                records.write(to_device(sel, records.A.device), B, A, rows)
        # The recycled slots' EMAs (every slot's with reset_all_scores), by a 0/1 mask; the A
        # side only for the pairs this process holds.
        keep = [[1.0] * self.r for _ in self.layers]
        for i, e in zip(rows, events, strict=True):
            for k in range(self.r) if reset_all_scores else e.slots:
                keep[i][k] = 0.0
        mask = to_device(torch.tensor(keep), self.ibar_A.device)
        a0, a1 = self.pair_span
        self.ibar_A.mul_(mask[:, a0:a1, None])
        self.ubar_A.mul_(mask[:, a0:a1, None])
        self.ibar_B.mul_(mask[:, None, :])
        self.ubar_B.mul_(mask[:, None, :])
        optimizer_reset.on_switch([e.layer for e in events], targets, slots)


def switch_groups(names: Sequence[str], group_of: Mapping[str, LayerGroup]) -> list[list[str]]:
    """The layer names by switch operation, in the controller's order: the layers of one group
    together."""
    groups: dict[int, list[str]] = {}
    for name in names:
        groups.setdefault(id(group_of[name]), []).append(name)
    return list(groups.values())


def build_groups(layers: Sequence[LayerState]) -> tuple[list[LayerGroup], dict[str, LayerGroup]]:
    """Group the layers whose kind can batch them (:meth:`~srlora.kinds.base.LoraTarget.batch_key`),
    each other layer alone, keeping the controller's order; returns the groups and each
    layer's group."""
    keyed: dict[object, list[LayerState]] = {}
    for layer in layers:
        key = layer.target.batch_key()
        key = ("alone", layer.name) if key is None else (key, layer.r, layer.r_prime, layer.limit, layer.cache.U.device)
        keyed.setdefault(key, []).append(layer)
    groups = [LayerGroup(members) for members in keyed.values()]
    return groups, {layer.name: group for group in groups for layer in group.layers}


def apply_switches(
    planned: Sequence[tuple[LayerState, SwitchEvent]],
    groups: Mapping[str, LayerGroup],
    reset_all_scores: bool,
    optimizer_reset: OptimizerStateReset,
    vectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """The tensor side of planned switches, group by group (:meth:`LayerGroup.apply`);
    ``vectors``: the new pairs of each layer where they do not come from the SVD cache."""
    batches: dict[int, tuple[LayerGroup, list[SwitchEvent]]] = {}
    for layer, event in planned:
        group = groups[layer.name]
        batches.setdefault(id(group), (group, []))[1].append(event)
    for group, events in batches.values():
        group.apply(events, reset_all_scores, optimizer_reset, vectors)


def pair_scores(layers: Sequence[LayerState], groups: Mapping[str, LayerGroup], reduce: bool = True) -> torch.Tensor:
    """Every layer's pair scores ``S_k``, concatenated in the order of ``layers`` (float32, on
    the first layer's device), from its group's stacked EMAs (a few batched operations per
    group); summed over processes where a layer's importance is split among them."""
    device = layers[0].importance.ibar_A.device
    rows: dict[str, torch.Tensor] = {}
    for group in {id(g): g for g in groups.values()}.values():
        rows.update(zip(group.names, group.pair_scores().unbind(0), strict=True))
    flat = torch.cat([rows[layer.name].float().to(device, non_blocking=True) for layer in layers])
    if reduce:
        _reduce_partial(layers, flat)
    return flat


def adaptive_due(layers: Sequence[LayerState], step: int, groups: Mapping[str, LayerGroup]) -> list[LayerState]:
    """The layers whose adaptive trigger fires after optimizer step ``step`` and whose
    schedule allows a switch then; every layer's scores reach the host in one transfer."""
    flat = pair_scores(layers, groups).cpu()
    scores = flat.split([layer.r for layer in layers])
    due = []
    for layer, layer_scores in zip(layers, scores, strict=True):
        assert layer.trigger is not None and layer.schedule is not None
        # The trigger counts every step, even those on which the schedule forbids a switch.
        fire = layer.trigger.update(layer_scores, layer.r_prime)
        if fire and layer.schedule.allows(step, layer.switches_done):
            due.append(layer)
    return due


def switch_inputs(
    layers: Sequence[LayerState],
    groups: Mapping[str, LayerGroup],
    extra: Sequence[torch.Tensor | None] | None = None,
) -> tuple[list[list[float]], list[bool], list[torch.Tensor | None]]:
    """What the switches of ``layers`` read on the host, in one device-to-host transfer:
    each layer's pair scores (a list of floats), whether its ``A`` and ``B`` are finite,
    and an ``extra`` float vector per layer (the direction policy's host_reads). Batched:
    the number of tensor operations grows with the number of groups, not of layers."""
    if not layers:
        return [], [], []
    extra = list(extra) if extra is not None else [None] * len(layers)
    scores = pair_scores(layers, groups, reduce=False)
    factors = [t for layer in layers for t in layer.target.local_factors()]
    # The largest |entry| of each A and B: finite exactly when every entry is.
    peaks = [p.float() for p in torch._foreach_norm(factors, float("inf"))]
    bad = (~torch.isfinite(torch.stack(peaks))).float().to(scores.device, non_blocking=True)
    shared = torch.cat([scores, bad])  # summed over processes where the importance is split
    _reduce_partial(layers, shared)
    own = [more.float().to(scores.device, non_blocking=True) for more in extra if more is not None]
    host = torch.cat([shared, *own]).cpu().tolist()
    n_scores = sum(layer.r for layer in layers)
    flags, rest = host[n_scores : n_scores + len(factors)], host[n_scores + len(factors) :]
    out_scores, finite, gathered = [], [], []
    at, more_at = 0, 0
    for i, (layer, more) in enumerate(zip(layers, extra, strict=True)):
        out_scores.append(host[at : at + layer.r])
        at += layer.r
        finite.append(not (flags[2 * i] or flags[2 * i + 1]))
        if more is None:
            gathered.append(None)
        else:
            gathered.append(torch.tensor(rest[more_at : more_at + more.numel()]))
            more_at += more.numel()
    return out_scores, finite, gathered


def _reduce_partial(layers: Sequence[LayerState], flat: torch.Tensor) -> None:
    """Sum ``flat`` over the processes when some layer's importance is split among them."""
    partial = next((layer for layer in layers if layer.importance.partial), None)
    if partial is not None:
        partial.target.reduce_(flat)


def mark_exhausted(layers: Iterable[LayerState]) -> list[LayerState]:
    """The layers that have just run out of unused directions (marked, so that each is
    reported once)."""
    out = []
    for layer in layers:
        if not layer.can_switch and not layer.exhausted:
            layer.exhausted = True
            out.append(layer)
    return out
