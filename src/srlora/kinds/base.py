"""What every kind of adapted layer provides: the interface the method's code talks to.

One PEFT LoRA layer ``y = x W^T + s x A^T B^T`` (``W: (m, n)``, ``A: (r, n)``, ``B: (m, r)``)
is driven through one :class:`LoraTarget`, whose subclass is chosen once, when the layer is
found (:func:`srlora.targets.find_lora_targets`), from where its tensors live:

* :class:`~srlora.kinds.dense.DenseTarget`: a float weight in this process (``nn.Linear``,
  transformers' ``Conv1D``); DDP replicas are this kind too;
* :class:`~srlora.kinds.fsdp2.Fsdp2Target`: FSDP2 (``fully_shard``) row shards;
* :class:`~srlora.kinds.zero3.Zero3Target`: DeepSpeed ZeRO-3 partitions;
* :class:`~srlora.kinds.bnb.BnbTarget`: a bitsandbytes 4/8-bit base that is
  never written, with low-rank side factors carrying what SRLoRA adds to ``W``.

A kind owns what differs between them: how the effective weight is read, how the PiSSA
initialisation and a switch write the layer, which gradients and weights the importance
reads, how the optimizer's moments of recycled slices are reached, what export and
checkpoints can take from it, and what it refuses. The method's code
(:class:`~srlora.layer.LayerState`, the controller, importance, export, checkpoint)
asks the target and never branches on its kind. A fifth kind (GPTQ, torchao's quantized
tensors...) is one more subclass here and one more case in
:func:`srlora.targets.kind_of`.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..config import SRLoRAConfig
from ..record import FusedRecord
from ..svd import SVDCache

# What a layer whose A or B has no gradient while others have one raises, under every kind.
NO_GRAD = "a LoRA A or B has no gradient while others have one; is part of the adapter frozen?"


def local_index(index: torch.Tensor, span: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(which, local)``: the positions of ``index`` that fall in ``span``, and their
    indices relative to it (the part of a set of rows that a process holds)."""
    start, stop = span
    which = ((index >= start) & (index < stop)).nonzero().flatten()
    return which, index[which] - start


class LoraTarget(abc.ABC):
    """One PEFT LoRA layer (``peft.tuners.lora.LoraLayer``), one adapter.

    Attributes:
        name: module name inside the PEFT model.
        module: the PEFT LoRA layer.
        adapter: adapter name.
        kind: a short name of the kind (``"dense"``, ``"fsdp2"``, ``"zero3"``, ``"bnb"``),
            for messages and figures.
        writes_base_weight: switches change the frozen weight itself (a checkpoint must then
            hold it); ``False`` for a base that is never written.
        records_entries: the kind needs the record of every pair that entered the slots even
            under the paper's entries (a quantized base's side factors subtract it).
        split_among_processes: the layer or its optimizer state is split among processes
            (a checkpoint is then a folder with one file per rank).
        batches: layers of one :meth:`batch_key` switch together (the kind's batched
            classmethods); ``False``: each on its own, through this class's defaults.
    """

    kind: ClassVar[str] = "abstract"
    writes_base_weight: ClassVar[bool] = True
    records_entries: ClassVar[bool] = False
    split_among_processes: ClassVar[bool] = False
    batches: ClassVar[bool] = False

    def __init__(self, name: str, module: nn.Module, adapter: str) -> None:
        self.name = name
        self.module = module
        self.adapter = adapter

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, adapter={self.adapter!r})"

    @classmethod
    def check_module(cls, name: str, module: nn.Module, adapter: str, quantized: bool) -> None:
        """Raise ``ValueError``, with the way out, when this kind cannot drive PEFT layer
        ``module`` (``quantized``: over a bitsandbytes base); checked before anything changes."""
        return None  # most kinds drive any PEFT Linear

    # ------------------------------------------------------------------ reads common to every kind
    @property
    def base_layer(self) -> nn.Module:
        return self.module.get_base_layer()

    @property
    def base_param(self) -> nn.Parameter:
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    @property
    def lora_A(self) -> nn.Parameter:
        """``A``, shape ``(r, n)``."""
        return self.module.lora_A[self.adapter].weight

    @property
    def lora_B(self) -> nn.Parameter:
        """``B``, shape ``(m, r)``."""
        return self.module.lora_B[self.adapter].weight

    @property
    def scaling(self) -> float:
        """``s`` in ``W + s B A`` (``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA)."""
        return float(self.module.scaling[self.adapter])

    @property
    def r(self) -> int:
        return int(self.module.r[self.adapter])

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(getattr(self.module, "fan_in_fan_out", False))

    @property
    def shape(self) -> tuple[int, int]:
        """``(m, n)`` of the whole layer."""
        m, n = self.base_param.shape
        return (int(n), int(m)) if self.fan_in_fan_out else (int(m), int(n))

    @property
    def row_span(self) -> tuple[int, int]:
        """The rows of ``W`` and ``B`` (output features) this process holds."""
        return 0, self.shape[0]

    @property
    def pair_span(self) -> tuple[int, int]:
        """The rows of ``A`` (pairs) this process holds."""
        return 0, self.r

    @property
    def device(self) -> torch.device:
        """Where the adapter (and SRLoRA's state of the layer) lives."""
        return self.local_factors()[0].device

    def local_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A, B)`` as this process holds them (to read; a write under ``torch.no_grad()``)."""
        return self.lora_A, self.lora_B

    # ------------------------------------------------------------------ collectives
    @property
    def collective(self) -> bool:
        """Each process holds a part of the layer's importance: scores are summed over processes."""
        return False

    def reduce_(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Reduce ``t`` in place over the processes that share this layer (``"sum"`` or ``"min"``)."""
        return t

    @contextlib.contextmanager
    def whole(self, modify: bool) -> Iterator[None]:
        """Inside the block the layer's tensors are whole in this process; with ``modify``
        the writes made there are kept."""
        yield

    # ------------------------------------------------------------------ initialisation and switch
    @abc.abstractmethod
    def effective_weight(self) -> torch.Tensor:
        """``W + s B A`` in float32, ``(m, n)``: the weight the layer applies now, whole."""
        raise NotImplementedError

    def setup(self, config: SRLoRAConfig) -> None:
        """Called once, before the initialisation, with the run's config (a kind that needs
        settings from it reads them here)."""
        return None

    def prepare_cache(self, cache: SVDCache, full_rows: bool) -> SVDCache:
        """The part of the layer's SVD this process keeps (``full_rows``: all rows of ``U``)."""
        return cache

    def bind(self, record: FusedRecord | None, entered: FusedRecord | None) -> None:
        """Called once with the layer's records of fused pairs (``None`` under
        ``fused_records=False``) and of the pairs that entered the slots (``None`` where the SVD
        cache gives them, or none are kept), after the initialisation (a kind
        that keeps more state sets it up here)."""
        return None

    def new_record(self, capacity: int) -> FusedRecord:
        """An empty record of fused pairs shaped for the rows this process holds, with room
        for ``capacity`` pairs."""
        w0, w1 = self.row_span
        return FusedRecord(w1 - w0, self.shape[1], self.device, capacity)

    @abc.abstractmethod
    def pissa_init_(self, cache: SVDCache) -> None:
        """Put the top ``r`` directions of ``cache`` into ``(B, A)`` and keep the layer's
        function: ``W <- W_eff - s B A`` (or the kind's equivalent)."""
        raise NotImplementedError

    @abc.abstractmethod
    def switch_pairs_(
        self, slots: torch.Tensor, U: torch.Tensor, S: torch.Tensor, V: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Fuse pairs ``slots`` into ``W`` and re-initialise them as the PiSSA factors of the
        new pairs ``U (rows held, r')``, ``S (r',)``, ``V (n, r')`` (slot ``slots[i]`` receives
        column ``i``), keeping the layer's function. Returns, in float32, the fused pairs as
        they were and the new ones as the slots now hold them: ``(B_old (rows held, r'),
        A_old (r', n), B_new, A_new)``."""
        raise NotImplementedError

    def slot_factors(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(B[rows held, slots], A[slots])`` in float32, ``A`` whole (inside :meth:`whole`
        for a kind whose tensors are partitioned)."""
        A, B = self.local_factors()
        return B.detach()[:, slots].float(), A.detach()[slots].float()

    def batch_key(self) -> object | None:
        """Layers with equal keys switch as one batch (:mod:`srlora.switch`, through the
        kind's :meth:`switch_batched_`); ``None``: this layer switches on its own (a batch of one)."""
        return None

    @classmethod
    @torch.no_grad()
    def switch_batched_(
        cls,
        targets: Sequence[LoraTarget],
        U_new: torch.Tensor,
        S_new: torch.Tensor,
        V_new: torch.Tensor,
        slots: torch.Tensor,
        scaling: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`switch_pairs_` of ``L`` layers of this kind: ``U_new (L, r', rows held)``,
        ``S_new (L, r')``, ``V_new (L, r', n)``, ``slots (L, r')`` (on the host), ``scaling
        (L,)``. Returns ``(B_old (L, rows held, r'), A_old (L, r', n), B_new, A_new)`` in
        float32. This default switches them one by one, each whole (:meth:`whole`); a kind
        that batches overrides it."""
        out = []
        for i, target in enumerate(targets):
            U, V = U_new[i].T.contiguous(), V_new[i].T.contiguous()
            with target.whole(modify=True):  # ZeRO-3: whole, rank 0's writes kept
                out.append(target.switch_pairs_(slots[i], U, S_new[i], V))
        B_old, A_old, B_new, A_new = (torch.stack(parts) for parts in zip(*out, strict=True))
        return B_old, A_old, B_new, A_new

    # ------------------------------------------------------------------ importance
    def has_grad(self) -> bool:
        """This optimizer step carries a gradient for the layer's adapter."""
        return self.lora_A.grad is not None

    @abc.abstractmethod
    def importance_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(A, dA, B, dB)``: the weights and gradients the scores read, as this process holds them."""
        raise NotImplementedError

    @classmethod
    def importance_inputs_batched(
        cls, targets: Sequence[LoraTarget]
    ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """:meth:`importance_inputs` of ``L`` layers of this kind, in order; this default goes
        layer by layer, a kind that gathers them (a collective per tensor) overrides it."""
        return [target.importance_inputs() for target in targets]

    # ------------------------------------------------------------------ optimizer
    def optimizer_tensors(self) -> tuple[torch.Tensor, ...]:
        """The tensors an optimizer must hold (by identity) for SRLoRA to reach their state."""
        return self.lora_A, self.lora_B

    @property
    def seeds_moments(self) -> bool:
        """``optimizer_reset="seed"`` can seed this layer's second moments (else it acts as ``"zero"``)."""
        return True

    @abc.abstractmethod
    def zero_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        """Zero the moments of rows ``slots`` of ``A`` and columns ``slots`` of ``B``."""
        raise NotImplementedError

    @abc.abstractmethod
    def seed_moments_(self, optimizer: torch.optim.Optimizer, slots: torch.Tensor) -> None:
        """Seed Adam's second moment of the recycled slices from their gradient (:mod:`srlora.optim_state`)."""
        raise NotImplementedError

    @classmethod
    def zero_moments_batched_(
        cls, optimizer: torch.optim.Optimizer, targets: Sequence[LoraTarget], slots: torch.Tensor
    ) -> None:
        """:meth:`zero_moments_` of ``L`` layers of this kind, ``slots (L, r')`` on the host;
        this default goes layer by layer, a kind that batches overrides it."""
        for target, row in zip(targets, slots, strict=True):
            target.zero_moments_(optimizer, row)

    @classmethod
    def seed_moments_batched_(
        cls, optimizer: torch.optim.Optimizer, targets: Sequence[LoraTarget], slots: Sequence[Sequence[int]]
    ) -> None:
        """:meth:`seed_moments_` of ``L`` layers of this kind (each its own list of slots);
        this default goes layer by layer, a kind that batches overrides it."""
        for target, row in zip(targets, slots, strict=True):
            target.seed_moments_(optimizer, torch.tensor(list(row), dtype=torch.long))

    @classmethod
    def step_hooks(cls, optimizer: Any, before: Callable[[], Any], after: Callable[[bool], Any]) -> list[Any] | None:
        """Run ``before()`` ahead of each optimizer step that applies gradients and
        ``after(skipped)`` behind it, where this kind's optimizer steps differently from a
        ``torch.optim.Optimizer``; returns handles with ``remove()``, or ``None``: the torch
        optimizer's own step hooks do it."""
        return None

    # ------------------------------------------------------------------ export, merge, checkpoint
    def refusal(self, what: str) -> str | None:
        """Why this layer cannot take part in ``what`` (``"attach"``, ``"export_lora"``,
        ``"merge_and_unload"``, ``"save_checkpoint"``), with the way out; ``None``: it can."""
        return None

    @abc.abstractmethod
    def total_update_factors(
        self, cache: SVDCache, used: torch.Tensor, record: FusedRecord, entered: FusedRecord | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(P (m, k), Q (k, n))`` with ``P Q = W_t + s B A - W0`` in float32: ``s F_B F_A +
        s B A - s E_B E_A``, the entered pairs ``E`` from ``entered`` or, where it is ``None``,
        from the cache (``U_p diag(S_p) V_p^T`` of the directions ``used``)."""
        raise NotImplementedError

    @abc.abstractmethod
    def merge_adapter_(self) -> None:
        """``W <- W + s B A``: the adapter merged into the weight this process holds (the
        LoRA modules are removed afterwards)."""
        raise NotImplementedError

    def merged_module(self, update: Callable[[], torch.Tensor]) -> nn.Module | None:
        """The plain module that replaces this layer when the adapters are merged (``update()``
        gives its total update ``(m, n)``); ``None`` where PEFT's own merge does it."""
        return None

    def extra_bytes(self) -> int:
        """Memory the kind keeps beyond the method's common state (e.g. side factors)."""
        return 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The kind's own state (empty for most)."""
        return {}

    def check_state(self, state: dict[str, torch.Tensor], pointer: int) -> None:
        """Raise :class:`~srlora.errors.CheckpointError` when ``state`` does not fit."""
        return None  # most kinds keep no state of their own

    def load_state_dict(self, state: dict[str, torch.Tensor], pointer: int) -> None:
        """Restore :meth:`state_dict`."""
        return None
