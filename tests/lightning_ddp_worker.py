"""Run by test_integration_lightning.py: a Lightning Trainer with SRLoRALightningCallback under
DDP (torchrun, 2 CPU processes, gloo), each rank on half of every global batch, or (``--reference``)
one process on the full batches. ``--config`` gives the callback an SRLoRAConfig (built in its
setup hook) instead of a controller built beforehand. ``--deepspeed 3`` (GPU only: Lightning's
DeepSpeedStrategy refuses a CPU; scripts/gpu_check.sh runs it) trains under DeepSpeed ZeRO at that
stage instead of DDP, one rank per GPU. Writes this process's effective weights and switch history."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import lightning.pytorch as pl
from conftest import CASES, make_peft
from procgroup import leave_process_group
from trainer_zero3_worker import effective_weights

from srlora import SRLoRA, SRLoRAConfig
from srlora.integrations.lightning import SRLoRALightningCallback

STEPS = 40
PER_RANK = 4


class Module(pl.LightningModule):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        return self.model(input_ids=batch[0], labels=batch[0]).loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=2e-3)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--reference", action="store_true")
    ap.add_argument("--config", action="store_true")
    ap.add_argument("--deepspeed", type=int, default=0, help="DeepSpeedStrategy at this ZeRO stage (GPU only)")
    ap.add_argument("--both", action="store_true", help="the callback given a controller, then a config")
    args = ap.parse_args(argv)
    if args.both:  # one launch, two Lightning runs over the same process group
        for extra in ([], ["--config"]):
            main([args.out, *extra])
        return
    world = 1 if args.reference else int(os.environ.get("WORLD_SIZE", 2))
    torch.manual_seed(0)
    model = make_peft(CASES["gpt2"], r=4, alpha=8)
    config = SRLoRAConfig(r_target=16, gamma=0.5, total_steps="auto", switch_interval=10)
    callback = SRLoRALightningCallback(config if args.config else SRLoRA(model, config))
    g = torch.Generator().manual_seed(0)
    n = 8 * PER_RANK * 2
    # a learnable sequence: each token follows from the one before
    start = torch.randint(0, 100, (n, 1), generator=g)
    ids = (start + 7 * torch.arange(12)) % 100
    # Rank k reads examples k, k+2, ... (Lightning's own distributed sampler would shuffle), so a
    # global batch is the same 8 consecutive examples the reference reads at once.
    data = torch.utils.data.TensorDataset(ids)
    sampler = (
        torch.utils.data.SequentialSampler(data)
        if world == 1
        else torch.utils.data.DistributedSampler(
            data, int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"]), shuffle=False
        )
    )
    loader = torch.utils.data.DataLoader(data, batch_size=PER_RANK * 2 // world, sampler=sampler)
    from lightning.pytorch.strategies import DeepSpeedStrategy

    trainer = pl.Trainer(
        max_steps=STEPS,
        callbacks=[callback],
        gradient_clip_val=1.0,
        accelerator="gpu" if args.deepspeed else "cpu",
        devices=world,
        num_nodes=1,
        strategy=DeepSpeedStrategy(stage=args.deepspeed) if args.deepspeed else "ddp" if world > 1 else "auto",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=args.out,
        deterministic=True,
        use_distributed_sampler=False,
    )
    trainer.fit(Module(model), loader)
    ctl = callback.controller
    tag = "reference" if args.reference else ("config" if args.config else "controller")
    tag += f"-zero{args.deepspeed}" if args.deepspeed else ""
    rank = trainer.global_rank
    torch.save(
        {
            "weights": effective_weights(ctl, model),  # gathered under ZeRO-3 (every rank calls it)
            "history": ctl.history,
            "kinds": sorted({layer.target.kind for layer in ctl.layers.values()}),
            "steps": ctl.global_step,
        },
        Path(args.out) / f"lightning-{tag}-rank{rank}.pt",
    )


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    leave_process_group(strict=False)  # after main: a framework keeps its groups (tests/procgroup.py)
