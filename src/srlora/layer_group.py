"""Layers that switch as one batch: every q/k/v projection of a transformer, every MLP-in...

A switch is a handful of small operations per layer (gather the slots, two rank-``r'``
products, the weight update, the factor writes, the record, the importance reset, the
optimizer's moments). Looping over layers makes its cost grow with their number, not with
the work. A :class:`LayerGroup` holds layers of a kind that can be batched
(:meth:`~srlora.kinds.base.LoraTarget.batch_key`: same shape, rank, ``r'``, dtypes and
device) and keeps their SVD caches, importance EMAs and fused records *stacked*, each
:class:`~srlora.layer_state.LayerState` holding views of its row, so that for the ``L``
layers of a group::

    U (L, m, k), S (L, k), V (L, n, k)                 the SVD caches
    I_bar_A, U_bar_A (L, r, n), I_bar_B, U_bar_B (L, m, r)   the importance EMAs
    F_B^T (L, cap, m), F_A (L, cap, n)                  the fused records

and one switch of any of its layers is a fixed number of batched operations: gather the new
directions (``U[l, :, d]``...), the PiSSA factors, ``bmm`` for the fused update, ``_foreach``
writes into the parameters, one indexed write into the records, one masked product per EMA
and per optimizer moment. Each layer still decides its own switch (:meth:`LayerState.plan`,
plain Python) and keeps its own books (:meth:`LayerState.commit`); the group only does the
tensor side. Kinds that cannot be batched (FSDP2 shards, ZeRO-3 partitions, quantized
bases) switch layer by layer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .devices import to_device
from .layer_state import LayerState, SwitchEvent
from .optim_state import OptimizerStateReset
from .record import FusedRecord
from .svd import SVDCache

# The batched weight update materialises (L, m, n) float32 deltas: groups are cut into
# chunks of at most this many elements (256 MiB), so a 7B model's 4096 x 11008 layers go
# a few at a time.
CHUNK_ELEMENTS = 1 << 26


class LayerGroup:
    """Layers of one batchable kind and shape that switch together (see the module doc).

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
        caches = [layer.cache for layer in self.layers]
        self.U = torch.stack([c.U for c in caches])
        self.S = torch.stack([c.S for c in caches])
        self.V = torch.stack([c.V for c in caches])
        ema = [torch.stack([layer.importance.tensors()[j] for layer in self.layers]) for j in range(4)]
        self.ibar_A, self.ubar_A, self.ibar_B, self.ubar_B = ema
        stores = [layer.record.storage() for layer in self.layers]
        self.F_Bt = torch.stack([Bt for Bt, _ in stores])
        self.F_A = torch.stack([A for _, A in stores])
        # The records of the entered pairs, where the layers keep them (entries not the cache's).
        entered = [layer.entered.storage() for layer in self.layers if layer.entered is not None]
        self.E_Bt = torch.stack([Bt for Bt, _ in entered]) if entered else None
        self.E_A = torch.stack([A for _, A in entered]) if entered else None
        for i, layer in enumerate(self.layers):
            layer.use_cache(SVDCache(self.U[i], self.S[i], self.V[i], caches[i].row_offset))
            layer.importance.use_storage(*(t[i] for t in ema))
            layer.record.use_storage(self.F_Bt[i], self.F_A[i])
            if layer.entered is not None and self.E_Bt is not None and self.E_A is not None:
                layer.entered.use_storage(self.E_Bt[i], self.E_A[i])
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
        """``S_k`` of every layer, ``(L, r)`` float32, in a few batched operations."""
        score_A = (self.ibar_A * self.ubar_A).mean(dim=2)
        return score_A.add_((self.ibar_B * self.ubar_B).mean(dim=1))

    @torch.no_grad()
    def apply(
        self,
        events: Sequence[SwitchEvent],
        reset_all_scores: bool,
        optimizer_reset: OptimizerStateReset | None = None,
        vectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> None:
        """The tensor side of ``events`` (planned by the group's layers, at most one each):
        the kind's batched writes, the records, the importance reset, the moments.
        ``vectors``: each layer's new pairs ``(U (m, r'), V (n, r'))`` where they do not come
        from the cache (:meth:`LayerState.new_pairs`)."""
        for start in range(0, len(events), self.chunk):
            self._apply(events[start : start + self.chunk], reset_all_scores, optimizer_reset, vectors)

    def _new_pairs(
        self, events: Sequence[SwitchEvent], sel: torch.Tensor, vectors: Mapping[str, tuple] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(U_new (L', r', m), S_new (L', r'), V_new (L', r', n))`` on the group's device: the
        given vectors stacked, or the directions gathered from the stacked caches; with the
        layers' entry singular value where they have one."""
        sel_d = to_device(sel, self.device)
        if vectors is not None:
            U_new = torch.stack([vectors[e.layer][0] for e in events]).transpose(1, 2).to(self.device).float()
            V_new = torch.stack([vectors[e.layer][1] for e in events]).transpose(1, 2).to(self.device).float()
            S_new = U_new.new_ones(U_new.shape[:2])
        else:
            directions = torch.tensor([e.directions for e in events], dtype=torch.long)
            where = self.U.device
            sel_c, dir_c = to_device(sel, where)[:, None], to_device(directions, where)
            U_new = to_device(self.U[sel_c, :, dir_c], self.device)
            S_new = to_device(self.S[sel_c, dir_c], self.device)
            V_new = to_device(self.V[sel_c, :, dir_c], self.device)
        if self.entry_sigma is not None:
            S_new = self.entry_sigma[sel_d][:, None].expand(-1, self.r_prime).contiguous()
        return U_new, S_new, V_new

    def _apply(
        self,
        events: Sequence[SwitchEvent],
        reset_all_scores: bool,
        optimizer_reset: OptimizerStateReset | None,
        vectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
    ) -> None:
        rows = [self.position[e.layer] for e in events]
        layers = [self.layers[i] for i in rows]
        whole = rows == list(range(len(self.layers)))
        slots = to_device(torch.tensor([e.slots for e in events], dtype=torch.long), self.device)
        sel = torch.tensor(rows, dtype=torch.long)
        U_new, S_new, V_new = self._new_pairs(events, sel, vectors)
        sel_d = to_device(sel, self.device)
        scaling = self.scaling if whole else self.scaling[sel_d]
        targets = [layer.target for layer in layers]
        B_old, A_old, B_new, A_new = self.kind.switch_batched_(targets, U_new, S_new, V_new, slots, scaling)
        # The records: each layer's next r' columns (of the fused pairs, and of the entered ones).
        _write_records(self.F_Bt, self.F_A, [layer.record for layer in layers], sel_d, B_old, A_old)
        if self.E_Bt is not None and self.E_A is not None:
            entered = [layer.entered for layer in layers]
            _write_records(self.E_Bt, self.E_A, entered, sel_d, B_new, A_new)  # type: ignore[arg-type]
        # The recycled slots' EMAs (every slot's with reset_all_scores), by a 0/1 mask.
        keep = [[1.0] * self.r for _ in self.layers]
        for i, e in zip(rows, events, strict=True):
            for k in range(self.r) if reset_all_scores else e.slots:
                keep[i][k] = 0.0
        mask = to_device(torch.tensor(keep), self.device)
        self.ibar_A.mul_(mask[:, :, None])
        self.ubar_A.mul_(mask[:, :, None])
        self.ibar_B.mul_(mask[:, None, :])
        self.ubar_B.mul_(mask[:, None, :])
        if optimizer_reset is not None:
            recycled = [[0.0] * self.r for _ in events]
            for row, e in zip(recycled, events, strict=True):
                for k in e.slots:
                    row[k] = 1.0
            optimizer_reset.on_switch_batch(
                [e.layer for e in events], targets, to_device(torch.tensor(recycled), self.device), events
            )


def _write_records(
    Bt: torch.Tensor,
    A: torch.Tensor,
    records: Sequence[FusedRecord],
    sel: torch.Tensor,
    B_new: torch.Tensor,
    A_new: torch.Tensor,
) -> None:
    """Write pairs ``B_new (L', m, r')``, ``A_new (L', r', n)`` into the next ``r'`` places of
    each layer's record, stacked as ``Bt (L, cap, m)``, ``A (L, cap, n)``: one indexed write each."""
    r_prime = int(A_new.shape[1])
    pos = to_device(torch.tensor([[rec.count + j for j in range(r_prime)] for rec in records]), Bt.device)
    Bt[sel[:, None], pos] = B_new.transpose(1, 2).to(Bt.dtype)
    A[sel[:, None], pos] = A_new.to(A.dtype)
    for rec in records:
        rec.counted(r_prime)


def switch_groups(names: Sequence[str], group_of: Mapping[str, LayerGroup]) -> list[list[str]]:
    """The layer names by switch operation, in the controller's order: the layers of one group
    together, a layer without a group alone."""
    groups: dict[int, list[str]] = {}
    for name in names:
        group = group_of.get(name)
        groups.setdefault(id(group) if group is not None else id(name), []).append(name)
    return list(groups.values())


def build_groups(layers: Sequence[LayerState]) -> tuple[list[LayerGroup], dict[str, LayerGroup]]:
    """Group the layers whose kind can batch them (:meth:`~srlora.kinds.base.LoraTarget.batch_key`),
    keeping the controller's order; returns the groups and each grouped layer's group."""
    keyed: dict[object, list[LayerState]] = {}
    for layer in layers:
        key = layer.target.batch_key()
        if key is not None:
            keyed.setdefault((key, layer.r, layer.r_prime, layer.limit, layer.cache.U.device), []).append(layer)
    groups = [LayerGroup(members) for members in keyed.values()]
    return groups, {layer.name: group for group in groups for layer in group.layers}


def apply_switches(
    planned: Sequence[tuple[LayerState, SwitchEvent]],
    groups: Mapping[str, LayerGroup],
    reset_all_scores: bool,
    optimizer_reset: OptimizerStateReset,
    vectors: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> None:
    """The tensor side of planned switches: a group's layers in a few batched operations
    (:meth:`LayerGroup.apply`), the others one by one (:meth:`LayerState.apply`); ``vectors``:
    the new pairs of each layer where they do not come from the SVD cache."""
    batches: dict[int, tuple[LayerGroup, list[SwitchEvent]]] = {}
    for layer, event in planned:
        group = groups.get(layer.name)
        if group is not None:
            batches.setdefault(id(group), (group, []))[1].append(event)
            continue
        layer.apply(event, reset_all_scores, None if vectors is None else vectors[layer.name])
        optimizer_reset.on_switch(layer.name, layer.target, torch.tensor(event.slots, dtype=torch.long))
    for group, events in batches.values():
        group.apply(events, reset_all_scores, optimizer_reset, vectors)
