"""Moving small host tensors (indices, scalars) to the device without stalling the host.

A plain ``t.to("cuda")`` of a CPU tensor makes PyTorch synchronise the stream after the
copy; with ``non_blocking=True`` it does not (the driver stages a pageable source before
the call returns, so reusing it afterwards is safe). Copies towards the host stay
blocking: the host must see the data.
"""

from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``t`` on ``device``; a host-to-device copy does not synchronise the stream."""
    device = torch.device(device)
    return t.to(device, non_blocking=t.device.type == "cpu" and device.type != "cpu")
