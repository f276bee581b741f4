"""One training run of LoRA, PiSSA or SRLoRA, and its outputs.

A run writes into its folder:

* ``config.json``: the :class:`~srlora.experiments.config.RunConfig`;
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

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..atomic import atomic_write_bytes, atomic_write_json
from ..controller import SRLoRA
from .adapters import peft_model
from .batches import EncodedText, Images, fixed_subset
from .config import RunConfig
from .metrics import compute_metrics
from .spec import identity
from .tasks import Task, load_task


def default_model(task: Task) -> str:
    """MiniLM for text tasks, DINOv2-S for image tasks (fetched on first use)."""
    from .assets import fetch

    return str(fetch("dinov2-s" if task.is_image else "minilm"))


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


def train_losses(run_dir: Path) -> list[float]:
    """The per-step training losses of a run, from its ``metrics.jsonl``."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"loss"' in line]


# What a run writes; a run removes them first, so that no result outlives its config.
RUN_FILES = ("results.json", "history.json", "metrics.jsonl", "config.json")


def config_digest(config_json: bytes) -> str:
    """The sha256 of a run's ``config.json``: ``results.json`` records it, binding the
    result to the configuration that produced it."""
    return hashlib.sha256(config_json).hexdigest()


def finished_run(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """``results.json`` of a run that finished with the same configuration, else ``None``.

    The result must name (by digest) the ``config.json`` beside it, and that config must be
    ``cfg``: a run killed after writing its new config, beside an older result, is not
    "finished"."""
    try:
        config_bytes = (run_dir / "config.json").read_bytes()
        saved_cfg = json.loads(config_bytes)
        results = json.loads((run_dir / "results.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    if results.get("config_sha256") != config_digest(config_bytes) or results.get("interrupted"):
        return None
    # The one resume scheme (spec.identity): a field added since the run was saved matches at its
    # default; no model asked for (the task's default) takes the run's whatever it was. The
    # config file also names what the run resolved (the model, the task's description).
    defaults = RunConfig().to_dict()
    saved_fields = {k: v for k, v in saved_cfg.items() if k in defaults}
    wanted, saved = (identity(c, defaults, ()) for c in (cfg.to_dict(), saved_fields))
    if cfg.model is None:
        saved.pop("model", None)
    return results if saved == wanted else None


def holds_run(run_dir: Path) -> bool:
    """``run_dir`` holds (part of) an earlier run's output."""
    return any((run_dir / name).exists() for name in RUN_FILES)


def preflight(cfg: RunConfig, task: Task) -> None:
    """Refuse, before any model is built, a run that cannot work: a local ``--model``
    folder that does not exist, or a training set smaller than one batch (which would
    never yield a step)."""
    resolve_device(cfg.device)
    local = cfg.model is not None and (Path(cfg.model).is_absolute() or cfg.model.startswith((".", "~")))
    if local and not Path(cfg.model).expanduser().is_dir():  # type: ignore[arg-type]
        raise FileNotFoundError(f"--model {cfg.model}: no such folder; give a model folder or a Hugging Face id.")
    n_train = len(task.train) if cfg.max_train is None else min(cfg.max_train, len(task.train))
    if n_train < cfg.batch_size:
        raise ValueError(
            f"{task.name}: {n_train} training example(s), fewer than one batch (--batch-size {cfg.batch_size}); "
            f"lower --batch-size or train on more data."
        )


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
        dtype=torch.float32,  # train in float32 whatever the checkpoint's dtype (an fp16 copy, say)
        num_labels=task.num_labels,
        problem_type="regression" if task.is_regression else "single_label_classification",
        ignore_mismatched_sizes=True,  # a checkpoint's own head of another size is replaced
    )
    base = base.to(resolve_device(cfg.device))  # PEFT builds the adapters, SRLoRA its SVD, where the model is
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
    model = peft_model(base, lora)
    ctl = None
    if cfg.method == "srlora":
        ctl = SRLoRA(model, cfg.srlora_config())
    # The inits draw different amounts of random numbers (LoRA's A does, PiSSA's does not):
    # re-seed so that every method of a seed trains with the same dropout masks.
    torch.manual_seed(cfg.seed)
    return model, ctl


def resolve_device(name: str) -> torch.device:
    """``"auto"``: the GPU when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA device here; use --device cpu (or auto).")
    return device


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(model: nn.Module, data: EncodedText | Images, task: Task, batch_size: int = 64) -> dict[str, float]:
    """Dev loss and the task's metrics."""
    model.eval()
    device = next(model.parameters()).device
    preds, losses, n = [], 0.0, 0
    for start in range(0, len(data), batch_size):
        index = list(range(start, min(start + batch_size, len(data))))
        out = model(**_to(data.batch(index), device))
        losses += out.loss.item() * len(index)
        n += len(index)
        logits = out.logits.float()
        preds.append((logits.squeeze(-1) if task.is_regression else logits.argmax(-1)).cpu())
    model.train()
    pred = torch.cat(preds).numpy()
    labels = data.labels.numpy()
    return {"eval_loss": losses / n, **compute_metrics(task.metrics, pred, labels)}


def prepare_data(cfg: RunConfig, task: Task, model_path: str) -> tuple[EncodedText | Images, EncodedText | Images]:
    """The run's training and dev inputs, after the ``max_train`` / ``max_eval`` caps (a
    fixed random subset: files are often sorted by label; the same for every method and seed)."""
    train_split, dev_split = task.train, task.dev
    if cfg.max_train is not None and cfg.max_train < len(train_split):
        train_split = train_split.subset(fixed_subset(len(train_split), cfg.max_train))
    if cfg.max_eval is not None and cfg.max_eval < len(dev_split):
        dev_split = dev_split.subset(fixed_subset(len(dev_split), cfg.max_eval))
    if task.is_image:
        return Images(train_split, cfg.image_size), Images(dev_split, cfg.image_size)  # type: ignore[arg-type]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return (
        EncodedText(tokenizer, train_split, cfg.max_length, task.is_regression),  # type: ignore[arg-type]
        EncodedText(tokenizer, dev_split, cfg.max_length, task.is_regression),  # type: ignore[arg-type]
    )


def progress_bar(total: int, desc: str) -> Any:
    """A tqdm bar; where stderr is not a terminal (a log, CI) it refreshes every 10 s
    instead of at every step, so a run writes a few lines, not hundreds."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, unit="step", leave=False, mininterval=0.1 if interactive else 10.0)


def run(cfg: RunConfig, out_dir: Path, task: Task | None = None, progress: bool = True) -> dict[str, Any]:
    """Train one method and write its outputs into ``out_dir``; returns ``results.json``'s content."""
    from transformers import get_linear_schedule_with_warmup

    task = task or load_task(cfg.task, cfg.data_dir)
    preflight(cfg, task)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        (out_dir / name).unlink(missing_ok=True)
    model_path = cfg.model or default_model(task)
    config_bytes = (
        json.dumps({**cfg.to_dict(), "model": model_path, "task_description": task.description}, indent=2) + "\n"
    ).encode()
    atomic_write_bytes(out_dir / "config.json", config_bytes)
    train, dev = prepare_data(cfg, task, model_path)

    model, ctl = build_model(cfg, task, model_path)
    device = next(model.parameters()).device
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
    bar = progress_bar(cfg.max_steps, f"{task.name}/{cfg.method}/seed{cfg.seed}") if progress else None
    with open(out_dir / "metrics.jsonl", "w") as log:
        try:
            model.train()
            stream = batches()
            for step in range(1, cfg.max_steps + 1):
                loss = model(**_to(train.batch(next(stream)), device)).loss
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
                    bar.set_postfix(loss=f"{losses[-1]:.3f}", refresh=False)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            if bar is not None:
                bar.close()

    results = summarize_run(cfg, task, losses, evals, params, model, time.perf_counter() - started, interrupted)
    results["config_sha256"] = config_digest(config_bytes)
    if ctl is not None:
        atomic_write_json(
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
    atomic_write_json(out_dir / "results.json", results)
    if interrupted:
        raise KeyboardInterrupt
    return results


def summarize_run(
    cfg: RunConfig,
    task: Task,
    losses: list[float],
    evals: list[dict[str, Any]],
    params: list[nn.Parameter],
    model: nn.Module,
    wall_s: float,
    interrupted: bool,
) -> dict[str, Any]:
    """``results.json``'s content (without SRLoRA's figures)."""
    n_early = max(1, len(losses) // 4)
    return {
        "task": task.name,
        "method": cfg.method,
        "seed": cfg.seed,
        "steps": len(losses),
        "final": evals[-1] if evals else None,
        "best_by_eval_loss": min(evals, key=lambda e: e["eval_loss"]) if evals else None,
        "headline_metric": task.metrics[0],
        "early_train_loss": float(np.mean(losses[:n_early])) if losses else None,
        "final_train_loss": float(np.mean(losses[-n_early:])) if losses else None,
        "trainable_params": sum(p.numel() for p in params),
        "total_params": sum(p.numel() for p in model.parameters()),
        "wall_s": wall_s,
        "interrupted": interrupted,
    }
