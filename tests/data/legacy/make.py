"""Write the checkpoints that tests/test_legacy_checkpoints.py loads: runs of the tiny test
models saved by an earlier version of srlora, and where each run ends when it goes on.

Run from the repository root with the srlora to record on the path, e.g. a checkout of an
earlier commit: ``PYTHONPATH=<checkout>/src:tests python tests/data/legacy/make.py``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import adam, build, train

from srlora import save_checkpoint

HERE = Path(__file__).resolve().parent

# name: (case, SRLoRAConfig options); the same table is in tests/test_legacy_checkpoints.py.
RUNS = {
    "mlp-spectrum": ("mlp", {"optimizer_reset": "seed"}),
    "mlp-gradient": ("mlp", {"direction_policy": "gradient"}),
    "mlp-subspace": ("mlp", {"direction_policy": "gradient_subspace", "entry_scale": 0.25}),
    "mlp-subspace-unscaled": ("mlp", {"direction_policy": "gradient_subspace"}),  # entry_scale None: 1.0 then
    "bert-spectrum": ("bert", {"reset_scores": "all"}),
}
BEFORE, AFTER = 25, 15  # steps before the checkpoint (switches after 10 and 20) and after it


def record(name: str, case: str, options: dict) -> None:
    torch.manual_seed(0)
    model, ctl = build(case, r=2, r_target=8, switch_interval=10, total_steps=BEFORE + AFTER, **options)
    opt = adam(model)
    train(model, case, opt, steps=BEFORE, seed=1, ctl=ctl)
    assert ctl.history, "the run must have switched before the checkpoint"
    save_checkpoint(HERE / f"{name}.ckpt", model, ctl, opt)
    train(model, case, opt, steps=AFTER, seed=2, ctl=ctl)
    final = {"model": model.state_dict(), "history": [e.to_dict() for e in ctl.history]}
    torch.save(final, HERE / f"{name}.final.pt")


if __name__ == "__main__":
    import srlora

    print("recording with", srlora.__file__)
    torch.set_num_threads(1)  # float sums are bit-equal only at a fixed thread count
    for run, (case_name, config) in RUNS.items():
        record(run, case_name, config)
