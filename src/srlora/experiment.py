"""One training run of LoRA, PiSSA or SRLoRA on a text task, and its outputs.

A run writes into its folder:

* ``config.json``: the :class:`RunConfig`;
* ``metrics.jsonl``: one line per optimizer step (``step``, ``loss``, ``lr``) and one
  per evaluation (``step``, ``eval_loss`` and the task's metrics), flushed as written;
* ``results.json``: final and best-by-dev-loss metrics, mean training loss over the
  first 25% of steps, wall time, trainable parameters (``"interrupted": true`` when
  stopped by Ctrl-C);
* ``history.json`` (SRLoRA): every switch event, and the direction held by each slot.

The three methods share everything but the adapter's initialisation and SRLoRA's
switches: same model, classifier head initialisation, data order, optimizer and
learning-rate schedule, and the same trainable parameters (PEFT LoRA with equal
``r`` and targets).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .config import SRLoRAConfig
from .controller import SRLoRA
from .data import ImageSplit, Split, Task, load_task
from .metrics import compute_metrics

METHODS = ("lora", "pissa", "srlora")


@dataclass
class RunConfig:
    """Everything that defines one run; the CLI's options are these fields."""

    task: str = field(
        default="mr",
        metadata={
            "help": "Task: mr, mr-reg, imdb, digits, mnist, fashion-mnist, or GLUE sst2/mrpc/cola/qnli/rte/stsb."
        },
    )
    method: str = field(default="srlora", metadata={"help": "lora (PEFT default init), pissa, or srlora."})
    model: str | None = field(
        default=None,
        metadata={
            "help": "Hugging Face model id or local folder (default: the fetched MiniLM for text, DINOv2-S for images)."
        },
    )
    data_dir: str | None = field(default=None, metadata={"help": "GLUE folder in the official TSV layout."})
    seed: int = field(default=1, metadata={"help": "Seed of the head initialisation and of the data order."})
    max_steps: int = field(default=150, metadata={"help": "Optimizer steps (N_all)."})
    batch_size: int = field(default=16, metadata={"help": "Training batch size."})
    lr: float = field(default=5e-4, metadata={"help": "Peak learning rate of AdamW (linear decay after warm-up)."})
    warmup_steps: int = field(default=15, metadata={"help": "Linear learning-rate warm-up steps."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay (the paper uses none)."})
    max_length: int = field(default=64, metadata={"help": "Tokens per example (longer inputs are truncated)."})
    image_size: int = field(
        default=56,
        metadata={
            "help": "Image tasks: input side in pixels (DINOv2: a multiple of 14; position embeddings interpolate)."
        },
    )
    r: int = field(default=8, metadata={"help": "LoRA rank r (trainable ranks per layer)."})
    alpha: float = field(default=8, metadata={"help": "LoRA alpha (scaling s = alpha / r)."})
    target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Module names to adapt (default: every Linear of the encoder's attention and MLP)."},
    )
    eval_every: int = field(default=50, metadata={"help": "Evaluate on dev every this many steps (and at the end)."})
    max_eval: int | None = field(default=None, metadata={"help": "Evaluate on at most this many dev examples."})
    max_train: int | None = field(default=None, metadata={"help": "Train on at most this many examples."})
    # SRLoRA's own options, as SRLoRAConfig defines them.
    r_target: int = field(default=32, metadata={"help": SRLoRAConfig.__dataclass_fields__["r_target"].metadata["help"]})
    gamma: float = field(default=0.5, metadata={"help": SRLoRAConfig.__dataclass_fields__["gamma"].metadata["help"]})
    optimizer_reset: str = field(
        default="seed", metadata={"help": SRLoRAConfig.__dataclass_fields__["optimizer_reset"].metadata["help"]}
    )
    reset_scores: str = field(
        default="recycled", metadata={"help": SRLoRAConfig.__dataclass_fields__["reset_scores"].metadata["help"]}
    )
    svd_method: str = field(
        default="full", metadata={"help": SRLoRAConfig.__dataclass_fields__["svd_method"].metadata["help"]}
    )
    adaptive_switch: bool = field(
        default=False, metadata={"help": SRLoRAConfig.__dataclass_fields__["adaptive_switch"].metadata["help"]}
    )
    adaptive_patience: int = field(
        default=10, metadata={"help": SRLoRAConfig.__dataclass_fields__["adaptive_patience"].metadata["help"]}
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        for name in ("max_steps", "batch_size", "max_length", "r", "eval_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")

    def srlora_config(self) -> SRLoRAConfig:
        return SRLoRAConfig(
            r_target=self.r_target,
            gamma=self.gamma,
            total_steps=self.max_steps,
            optimizer_reset=self.optimizer_reset,  # type: ignore[arg-type]
            reset_scores=self.reset_scores,  # type: ignore[arg-type]
            svd_method=self.svd_method,  # type: ignore[arg-type]
            adaptive_switch=self.adaptive_switch,
            adaptive_patience=self.adaptive_patience,
        )


# SPEC section 4 (the paper's Table 2): r_target / epochs / batch size / learning rate.
PAPER_GLUE = {
    "sst2": (512, 20, 16, 3e-5),
    "mrpc": (256, 20, 32, 2e-4),
    "cola": (256, 20, 16, 1e-4),
    "qnli": (128, 10, 32, 1e-4),
    "rte": (16, 50, 16, 1e-4),
    "stsb": (32, 20, 8, 1e-4),
}

PRESETS: dict[str, dict[str, Any]] = {
    # CPU-sized: about 2 minutes per method for MiniLM on MR with 2 cores (eval included).
    "quick": dict(
        max_steps=150,
        batch_size=16,
        lr=5e-4,
        warmup_steps=15,
        max_length=64,
        eval_every=50,
        r=8,
        alpha=8,
        r_target=32,
        gamma=0.5,
        max_eval=1000,
    ),
}
for _task, (_rt, _epochs, _bs, _lr) in PAPER_GLUE.items():
    PRESETS[f"paper-{_task}"] = dict(
        task=_task,
        r_target=_rt,
        batch_size=_bs,
        lr=_lr,
        r=8,
        alpha=8,
        gamma=0.5,
        max_length=128,
        warmup_steps=500,
        weight_decay=0.0,
        eval_every=500,
        epochs=_epochs,
        model="microsoft/deberta-v3-base",
    )


def apply_preset(name: str, overrides: dict[str, Any], train_size: int | None = None) -> dict[str, Any]:
    """The preset's values, then ``overrides``; ``epochs`` becomes ``max_steps``."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    values = dict(PRESETS[name])
    epochs = values.pop("epochs", None)
    values.update({k: v for k, v in overrides.items() if v is not None})
    if epochs is not None and "max_steps" not in overrides:
        if train_size is None:
            raise ValueError("a paper preset needs the training-set size to turn epochs into steps")
        values["max_steps"] = epochs * math.ceil(train_size / values["batch_size"])
    return values


def default_model(task: Task) -> str:
    """MiniLM for text tasks, DINOv2-S for image tasks (fetched on first use)."""
    from .assets import fetch

    return str(fetch("dinov2-s" if task.is_image else "minilm"))


IMAGE_MEAN = (0.485, 0.456, 0.406)  # ImageNet statistics, as DINOv2 was trained with
IMAGE_STD = (0.229, 0.224, 0.225)


class _Images:
    """Grayscale images resized to ``size`` and replicated to 3 normalised channels."""

    def __init__(self, split: ImageSplit, size: int) -> None:
        x = split.images.unsqueeze(1)
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x.expand(-1, 3, -1, -1)
        mean = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
        self.pixels = ((x - mean) / std).contiguous()
        self.labels = torch.tensor(split.labels, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.pixels[index], "labels": self.labels[index]}


def default_targets(model: nn.Module) -> list[str]:
    """Every ``nn.Linear`` of the encoder (attention and MLP), not the task head."""
    skip = ("classifier", "pooler", "score", "lm_head", "head")
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not any(part in skip for part in name.split(".")):
            names.append(name)
    if not names:
        raise ValueError("found no Linear layer to adapt; pass --target-modules")
    return names


class _Encoded:
    """A tokenized split, padded per batch."""

    def __init__(self, tokenizer, split: Split, max_length: int, regression: bool) -> None:
        enc = tokenizer(split.text_a, split.text_b, truncation=True, max_length=max_length)
        self.input_ids = enc["input_ids"]
        self.extra = {k: enc[k] for k in enc if k not in ("input_ids", "attention_mask")}
        self.labels = torch.tensor(split.labels, dtype=torch.float32 if regression else torch.long)
        self.pad_id = tokenizer.pad_token_id or 0

    def __len__(self) -> int:
        return len(self.input_ids)

    def batch(self, index: list[int]) -> dict[str, torch.Tensor]:
        width = max(len(self.input_ids[i]) for i in index)
        ids = torch.full((len(index), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(index), width), dtype=torch.long)
        out: dict[str, torch.Tensor] = {}
        extra = {k: torch.zeros((len(index), width), dtype=torch.long) for k in self.extra}
        for row, i in enumerate(index):
            n = len(self.input_ids[i])
            ids[row, :n] = torch.tensor(self.input_ids[i])
            mask[row, :n] = 1
            for k in self.extra:
                extra[k][row, :n] = torch.tensor(self.extra[k][i])
        out.update(input_ids=ids, attention_mask=mask, labels=self.labels[index], **extra)
        return out


def fixed_subset(n: int, k: int) -> list[int]:
    """``k`` of ``range(n)``, drawn with :data:`srlora.data.SPLIT_SEED`, in ascending order."""
    import random

    from .data import SPLIT_SEED

    return sorted(random.Random(SPLIT_SEED + n).sample(range(n), k))


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it over ``path``."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2))


def train_losses(run_dir: Path) -> list[float]:
    """The per-step training losses of a run, from its ``metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


def build_model(cfg: RunConfig, task: Task, model_path: str) -> tuple[nn.Module, SRLoRA | None]:
    """The PEFT model of ``cfg.method`` (and its SRLoRA controller)."""
    import peft
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected here
    torch.manual_seed(cfg.seed)  # the head's initialisation: the same for every method
    auto = AutoModelForImageClassification if task.is_image else AutoModelForSequenceClassification
    base = auto.from_pretrained(
        model_path,
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        ignore_mismatched_sizes=True,  # a checkpoint's own head of another size is replaced
    )
    targets = cfg.target_modules or default_targets(base)
    # Text: PEFT's sequence-classification wrapper (it trains the head). Images: the same
    # by hand, the fresh head trained in full as the head of a text model is.
    head = {"modules_to_save": ["classifier"]} if task.is_image else {"task_type": peft.TaskType.SEQ_CLS}
    lora = peft.LoraConfig(
        **head,
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=targets,
        init_lora_weights="pissa" if cfg.method == "pissa" else True,
    )
    model = peft.get_peft_model(base, lora)
    ctl = None
    if cfg.method == "srlora":
        ctl = SRLoRA(model, cfg.srlora_config())
    return model, ctl


@torch.no_grad()
def evaluate(model: nn.Module, data: _Encoded | _Images, task: Task, batch_size: int = 64) -> dict[str, float]:
    model.eval()
    preds, losses, n = [], 0.0, 0
    for start in range(0, len(data), batch_size):
        index = list(range(start, min(start + batch_size, len(data))))
        out = model(**data.batch(index))
        losses += out.loss.item() * len(index)
        n += len(index)
        logits = out.logits.float()
        preds.append(logits.squeeze(-1) if task.is_regression else logits.argmax(-1))
    model.train()
    pred = torch.cat(preds).numpy()
    labels = data.labels.numpy()
    return {"eval_loss": losses / n, **compute_metrics(task.metrics, pred, labels)}


def run(cfg: RunConfig, out_dir: Path, task: Task | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one method and write its outputs into ``out_dir``; returns ``results.json``'s content."""
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    out_dir.mkdir(parents=True, exist_ok=True)
    task = task or load_task(cfg.task, cfg.data_dir)
    model_path = cfg.model or default_model(task)
    _atomic_write_json(
        out_dir / "config.json", {**dataclasses.asdict(cfg), "model": model_path, "task_description": task.description}
    )
    train_split, dev_split = task.train, task.dev
    # Caps take a fixed random subset (files are often sorted by label), the same for
    # every method and seed.
    if cfg.max_train is not None and cfg.max_train < len(train_split):
        train_split = train_split.subset(fixed_subset(len(train_split), cfg.max_train))
    if cfg.max_eval is not None and cfg.max_eval < len(dev_split):
        dev_split = dev_split.subset(fixed_subset(len(dev_split), cfg.max_eval))
    train: _Encoded | _Images
    dev: _Encoded | _Images
    if task.is_image:
        train, dev = _Images(train_split, cfg.image_size), _Images(dev_split, cfg.image_size)  # type: ignore[arg-type]
    else:
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        train = _Encoded(tokenizer, train_split, cfg.max_length, task.is_regression)  # type: ignore[arg-type]
        dev = _Encoded(tokenizer, dev_split, cfg.max_length, task.is_regression)  # type: ignore[arg-type]

    model, ctl = build_model(cfg, task, model_path)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(opt, min(cfg.warmup_steps, cfg.max_steps), cfg.max_steps)
    if ctl is not None:
        ctl.attach(opt)

    # Identical data order for every method: a generator seeded by the run's seed only.
    order_gen = torch.Generator().manual_seed(cfg.seed)

    def batches():
        while True:
            perm = torch.randperm(len(train), generator=order_gen).tolist()
            for start in range(0, len(perm) - cfg.batch_size + 1, cfg.batch_size):
                yield perm[start : start + cfg.batch_size]

    losses: list[float] = []
    evals: list[dict[str, Any]] = []
    started = time.perf_counter()
    interrupted = False
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, desc=f"{task.name}/{cfg.method}/seed{cfg.seed}", unit="step", leave=False)
    with open(out_dir / "metrics.jsonl", "w") as log:
        try:
            model.train()
            stream = batches()
            for step in range(1, cfg.max_steps + 1):
                loss = model(**train.batch(next(stream))).loss
                loss.backward()
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                losses.append(loss.item())
                log.write(json.dumps({"step": step, "loss": losses[-1], "lr": lr}) + "\n")
                if step % cfg.eval_every == 0 or step == cfg.max_steps:
                    ev = {"step": step, **evaluate(model, dev, task)}
                    evals.append(ev)
                    log.write(json.dumps(ev) + "\n")
                log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.3f}")
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()

    n_early = max(1, len(losses) // 4)
    headline = task.metrics[0]
    best = min(evals, key=lambda e: e["eval_loss"]) if evals else None
    results = {
        "task": task.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "steps": len(losses),
        "final": evals[-1] if evals else None,
        "best_by_eval_loss": best,
        "headline_metric": headline,
        "early_train_loss": float(np.mean(losses[:n_early])) if losses else None,
        "final_train_loss": float(np.mean(losses[-n_early:])) if losses else None,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "wall_s": time.perf_counter() - started,
        "interrupted": interrupted,
    }
    if ctl is not None:
        _atomic_write_json(
            out_dir / "history.json",
            {
                "events": [e.to_dict() for e in ctl.history],
                "slot_directions": ctl.slot_directions(),
                "directions_used": ctl.directions_used(),
                "steps": len(losses),
                "r": cfg.r,
            },
        )
        results["directions_used"] = ctl.directions_used()
    _atomic_write_json(out_dir / "results.json", results)
    if interrupted:
        raise KeyboardInterrupt
    return results
