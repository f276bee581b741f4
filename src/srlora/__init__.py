"""SRLoRA: Subspace Recomposition in Low-Rank Adaptation, on top of PEFT LoRA.

>>> from srlora import SRLoRA, SRLoRAConfig
>>> ctl = SRLoRA(peft_model, SRLoRAConfig(r_target=64, total_steps=1000))  # doctest: +SKIP
>>> ctl.attach(optimizer)  # doctest: +SKIP
"""

from .config import SRLoRAConfig
from .controller import SRLoRA, SRLoRAWarning, SwitchEvent
from .optim_state import UnsupportedOptimizerWarning
from .schedule import SwitchSchedule

__all__ = [
    "SRLoRA",
    "SRLoRAConfig",
    "SRLoRAWarning",
    "SwitchEvent",
    "SwitchSchedule",
    "UnsupportedOptimizerWarning",
]
__version__ = "0.1.0"
