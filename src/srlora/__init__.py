"""SRLoRA: Subspace Recomposition in Low-Rank Adaptation, on top of PEFT LoRA.

>>> from srlora import SRLoRA, SRLoRAConfig
>>> ctl = SRLoRA(peft_model, SRLoRAConfig(r_target=64, total_steps=1000))  # doctest: +SKIP
>>> ctl.attach(optimizer)  # doctest: +SKIP
"""

from .checkpoint import load_checkpoint, save_checkpoint
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
    "load_checkpoint",
    "save_checkpoint",
]
__version__ = "0.1.0"
