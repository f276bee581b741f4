"""Run by test_sharded_checkpoint.py under torchrun (2 processes, gloo): rank 1 skips a collective call
(export_lora of an FSDP2 model); rank 0 must get a clear error, not wait forever.

    torchrun --nproc_per_node 2 missing_rank_worker.py OUT
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from procgroup import abandon_process_group
from sharded_worker import root_sharded_controller


def main() -> None:
    out = Path(sys.argv[1])
    ctl, rank = root_sharded_controller()
    if rank == 1:  # busy elsewhere: it never calls export_lora; it ends once rank 0 has its error
        deadline = time.monotonic() + 120
        while not (out / "rank0-error.txt").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        abandon_process_group()
    try:
        ctl.export_lora(out / "adapter")
        message = None
    except RuntimeError as exc:
        message = str(exc)
    (out / "rank0-error.txt").write_text(message or "no error")
    abandon_process_group()  # a rank never joins: the group cannot be torn down (tests/procgroup.py)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
