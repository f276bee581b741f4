"""Thin integrations over the framework-agnostic controller.

* :class:`SRLoRACallback` for the Hugging Face ``Trainer`` (``srlora.integrations.hf``);
* :class:`SRLoRALightningCallback` for PyTorch Lightning (``srlora.integrations.lightning``).

Both only attach the controller to the optimizer the framework builds, supply
``total_steps`` when the config says ``"auto"``, and keep SRLoRA's state in the
framework's checkpoints. Importing this package does not import either framework.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name == "SRLoRACallback":
        from .hf import SRLoRACallback

        return SRLoRACallback
    if name == "SRLoRALightningCallback":
        from .lightning import SRLoRALightningCallback

        return SRLoRALightningCallback
    raise AttributeError(name)


__all__ = ["SRLoRACallback", "SRLoRALightningCallback"]
