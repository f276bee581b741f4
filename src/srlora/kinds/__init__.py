"""The kinds of adapted layer SRLoRA drives, one module each (see :mod:`srlora.kinds.base`).

=================  ===========================================================================
kind               the layer's tensors
=================  ===========================================================================
``dense``          a float weight in this process (``nn.Linear``, transformers' ``Conv1D``)
``fsdp2``          FSDP2 (``fully_shard``) row shards: each rank holds rows of ``W``, ``B``, ``A``
``zero3``          DeepSpeed ZeRO-3 partitions, whole only inside DeepSpeed's gathers
``zero12``         DeepSpeed ZeRO-1/2: whole weights, partitioned masters, moments (and gradients)
``bnb``            a bitsandbytes 4/8-bit base, never written; side factors carry the changes
=================  ===========================================================================

:func:`srlora.targets.kind_of` picks the kind of a PEFT LoRA layer once, when SRLoRA is built.
"""

from .base import LoraTarget
from .bnb import BnbTarget
from .dense import DenseTarget
from .fsdp2 import Fsdp2Target
from .zero3 import Zero3Target
from .zero12 import Zero12Target

__all__ = ["BnbTarget", "DenseTarget", "Fsdp2Target", "LoraTarget", "Zero3Target", "Zero12Target"]
