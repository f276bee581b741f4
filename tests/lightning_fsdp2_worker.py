"""Run by test_integration_lightning.py: a Lightning Trainer with ``ModelParallelStrategy``
(FSDP2: the module's ``configure_model`` applies ``fully_shard`` to each transformer block and
the root over the strategy's data-parallel mesh) under torchrun, 2 CPU processes (gloo), each
rank on half of every global batch; or (``--reference``) one process on the full batches.
SRLoRA comes from ``SRLoRALightningCallback(SRLoRAConfig(...))``, built in its ``setup`` hook
(before ``configure_model`` shards the model). Writes the effective weights ``W + s B A``, the
switch history and the PEFT adapter ``export_lora`` makes (every rank calls it). Three epochs
of 8 steps, a switch every 10: a whole run; a run stopped after epoch 2 that saves Lightning's checkpoint; and
a run resumed from it, one after the other in one launch. The test runs the one-process
reference (:func:`fit` with ``world=1``).

    torchrun --nproc_per_node 2 lightning_fsdp2_worker.py OUT [--runs whole stop resume]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lightning.pytorch as pl
from conftest import CASES, make_peft
from fsdp_wraps_worker import GLOBAL_BATCH, batch, effective_weights
from launch import each
from procgroup import leave_process_group

from srlora import SRLoRAConfig
from srlora.integrations.lightning import SRLoRALightningCallback

# Three epochs of 8 steps; switches at steps 10 and 20: a run stopped after epoch 2 (step 16,
# 6 steps into a window) resumes exactly.
EPOCH, STEPS = 8, 24


class StopAfterEpoch(pl.Callback):
    """Ends the run after epoch ``epoch`` as a crash would, then the worker saves a checkpoint."""

    def __init__(self, epoch: int) -> None:
        self.epoch = epoch

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.epoch:
            trainer.should_stop = True


class Batches(torch.utils.data.Dataset):
    """Step ``i``'s global batch, this rank's share of it (the fully_shard tests' data)."""

    def __init__(self, world: int, rank: int) -> None:
        self.share, self.rank = GLOBAL_BATCH // world, rank

    def __len__(self) -> int:
        return EPOCH

    def __getitem__(self, i: int) -> dict:
        return {k: v[self.rank * self.share : (self.rank + 1) * self.share] for k, v in batch(i).items()}


class Module(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, shard: bool) -> None:
        super().__init__()
        self.model, self.shard = model, shard

    def configure_model(self) -> None:
        if not self.shard:
            return
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for block in self.model.base_model.model.bert.encoder.layer:
            fully_shard(block, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def training_step(self, b, batch_idx):  # type: ignore[no-untyped-def]
        return CASES["bert"].loss(self.model, {k: v[0] for k, v in b.items()})

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=1e-2)


def fit(out: Path, world: int, rank: int, stop_after_epoch: int | None = None, resume: bool = False) -> dict:
    """One Lightning run: FSDP2 over ``world`` ranks (or one process); stopped after an epoch
    and saved, resumed from that save, or whole. Returns what the test compares."""
    from lightning.pytorch.strategies import ModelParallelStrategy

    torch.manual_seed(0)
    model = make_peft(CASES["bert"], r=4, alpha=8)
    callback = SRLoRALightningCallback(SRLoRAConfig(r_target=16, gamma=0.5, switch_interval=10, total_steps="auto"))
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if world > 1 else "auto"
    stop = [StopAfterEpoch(stop_after_epoch)] if stop_after_epoch else []
    trainer = pl.Trainer(
        max_epochs=STEPS // EPOCH,
        callbacks=[callback, *stop],
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=out,
        use_distributed_sampler=False,
    )
    loader = torch.utils.data.DataLoader(Batches(world, rank), batch_size=1, shuffle=False)
    ckpt = out / "lightning-fsdp2-ckpt"  # Lightning's distributed checkpoint (a folder)
    trainer.fit(Module(model, shard=world > 1), loader, ckpt_path=ckpt if resume else None)
    ctl = callback.controller
    if stop_after_epoch:
        trainer.save_checkpoint(ckpt)  # every rank: model and optimizer shards, SRLoRA's per-rank states
        return {"stopped_at": ctl.global_step}
    tag = "reference" if world == 1 else "resumed" if resume else "fsdp2"
    ctl.export_lora(out / f"adapter-lightning-{tag}")  # a collective: rank 0 writes, one layer at a time
    return {
        "kinds": sorted({layer.target.kind for layer in ctl.layers.values()}),
        "weights": effective_weights(ctl),  # gathered: a collective, every rank calls it
        "history": [e.to_dict() for e in ctl.history],
        "steps": ctl.global_step,
    }


def main() -> None:
    """Each ``--runs`` in one launch: ``whole``, ``stop`` (after epoch 2, saved), ``resume``."""
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--runs", nargs="+", default=["whole", "stop", "resume"])
    args = ap.parse_args()
    rank = int(os.environ["RANK"])
    options = {"whole": {}, "stop": {"stop_after_epoch": 2}, "resume": {"resume": True}}
    results = each(args.runs, lambda name: fit(args.out, 2, rank, **options[name]))
    torch.save(results, args.out / f"lightning-fsdp2-rank{rank}.pt")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    leave_process_group(strict=False)  # after main: a framework keeps its groups (tests/procgroup.py)
