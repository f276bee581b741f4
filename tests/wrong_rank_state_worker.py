"""Run by test_sharded.py under torchrun (2 processes, gloo): a sharded model's SRLoRA state
saved by one process for all (as Accelerate's ``register_for_checkpointing`` does) and loaded
on rank 1 must be refused; rank 0 reloads its own state.

    torchrun --nproc_per_node 2 wrong_rank_state_worker.py OUT
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from procgroup import leave_process_group
from sharded_worker import root_sharded_controller

from srlora.errors import CheckpointError


def state_of_another_rank() -> dict:
    """Load rank 0's SRLoRA state on every rank: what each rank's ``load_state_dict`` said."""
    import torch.distributed as dist

    ctl, rank = root_sharded_controller()
    shared = [ctl.state_dict() if rank == 0 else None]
    dist.broadcast_object_list(shared, src=0)  # rank 0's state, given to every rank
    try:
        ctl.load_state_dict(shared[0])
        message = "loaded"
    except CheckpointError as exc:
        message = str(exc)
    return {"message": message}


def main() -> None:
    import torch.distributed as dist

    out = Path(sys.argv[1])
    result = state_of_another_rank()
    (out / f"rank{dist.get_rank()}.txt").write_text(result["message"])


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    leave_process_group()  # after main's objects are gone: tests/procgroup.py
