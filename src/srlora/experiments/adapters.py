"""The harness's PEFT models, built without messages that are neither the user's nor srlora's.

* PEFT's ``PeftModel`` reads ``model.is_gradient_checkpointing`` of the model it wraps, a
  property transformers 5 deprecated: every ``get_peft_model`` of a transformers model then
  prints a ``FutureWarning`` that names neither PEFT nor the caller. The harness builds its
  models here, with that one warning filtered for that one call.
* PEFT imports bitsandbytes when it is installed (srlora's ``quantized`` extra), whose CPU
  backend logs a warning at import when an optional kernel cannot be fetched from a model
  hub; the ``srlora`` command (its own process) raises that logger to errors before anything
  imports PEFT (:func:`quiet_imports`).

Nothing else is hidden, and a user's own ``get_peft_model`` or logging is not touched.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

from torch import nn

_PEFT_READS_DEPRECATED = r"`is_gradient_checkpointing` is deprecated"


def peft_model(base: nn.Module, lora: Any) -> nn.Module:
    """``peft.get_peft_model(base, lora)``, minus transformers' ``is_gradient_checkpointing``
    FutureWarning that PEFT's own check raises."""
    import peft

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PEFT_READS_DEPRECATED, category=FutureWarning)
        return peft.get_peft_model(base, lora)


def quiet_imports() -> None:
    """In the ``srlora`` command's process only: bitsandbytes' import-time warning about an
    optional CPU kernel (fetched from a hub) is not shown; its errors still are."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
