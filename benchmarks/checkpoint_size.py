"""Size of an srlora checkpoint against the model, for MiniLM (tiny BERT if not fetched).

    python benchmarks/checkpoint_size.py

A checkpoint stores the trainable parameters, buffers, optimizer state and controller
state, plus the frozen weight of each layer that has switched (others: a checksum).
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_overhead import load_base, lora

from srlora import SRLoRA, SRLoRAConfig, SRLoRAWarning, save_checkpoint


def main() -> None:
    base, source = load_base(None)
    model = lora(base, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SRLoRAWarning)
        ctl = SRLoRA(model, SRLoRAConfig(r_target=64, switch_interval=10**9))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ctl.attach(opt)
    batch = {"input_ids": torch.randint(0, base.config.vocab_size, (4, 32)), "labels": torch.tensor([0, 1, 0, 1])}
    model(**batch).loss.backward()
    opt.step()
    opt.zero_grad()
    full = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    with tempfile.TemporaryDirectory() as tmp:
        before = save_checkpoint(Path(tmp) / "a.ckpt", model, ctl, opt)
        ctl.switch()
        after = save_checkpoint(Path(tmp) / "b.ckpt", model, ctl, opt)
    print(f"model: {source}; full model state_dict {full / 2**20:.1f} MiB")
    print(f"checkpoint before any switch {before / 2**20:.1f} MiB; after every layer switched {after / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
