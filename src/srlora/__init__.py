"""SRLoRA: Subspace Recomposition in Low-Rank Adaptation, on top of PEFT LoRA.

>>> from srlora import SRLoRA, SRLoRAConfig
>>> ctl = SRLoRA(peft_model, SRLoRAConfig(r_target=64, total_steps=1000))  # doctest: +SKIP
>>> ctl.attach(optimizer)  # doctest: +SKIP

This package is the method only. The experiment harness (the ``srlora`` command, tasks,
plots, the results study) is :mod:`srlora.experiments`, with its own extras.
"""

from .checkpoint import load_checkpoint, save_checkpoint
from .config import SRLoRAConfig, SwitchBudget
from .controller import SRLoRA
from .errors import (
    DirectionsExhaustedWarning,
    NonFiniteWarning,
    ScheduleWarning,
    SRLoRAWarning,
    UnsupportedOptimizerWarning,
)
from .layer import LayerState, SwitchEvent
from .schedule import SwitchSchedule

__all__ = [
    "DirectionsExhaustedWarning",
    "LayerState",
    "NonFiniteWarning",
    "SRLoRA",
    "SRLoRAConfig",
    "SRLoRAWarning",
    "ScheduleWarning",
    "SwitchBudget",
    "SwitchEvent",
    "SwitchSchedule",
    "UnsupportedOptimizerWarning",
    "load_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"
