"""torchrun with 2 CPU processes (gloo): every rank makes identical switches."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

WORKER = Path(__file__).parent / "ddp_worker.py"


def test_ddp_two_processes_identical(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    assert r0["controller"]["history"] == r1["controller"]["history"]
    assert sorted({e["step"] for e in r0["controller"]["history"]}) == [20, 40, 60, 80, 100]
    for k, v in r0["model"].items():
        assert torch.equal(v, r1["model"][k]), k
    for name, layer in r0["controller"]["layers"].items():
        for k, v in layer["importance"].items():
            assert torch.equal(v, r1["controller"]["layers"][name]["importance"][k]), (name, k)
