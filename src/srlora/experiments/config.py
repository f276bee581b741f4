"""The configuration of one experiment run, and its presets.

A :class:`RunConfig` holds what the harness adds (task, model, optimisation, LoRA rank
and targets, evaluation) and, in its ``srlora`` field, the :class:`~srlora.SRLoRAConfig`
fields a run may set (:data:`PASSTHROUGH`: all but those a runner sets). Those are not copied here: the command
line builds their options from ``SRLoRAConfig``'s own fields and help texts, and
:meth:`RunConfig.srlora_config` builds the ``SRLoRAConfig`` with ``total_steps`` set to
the run's ``max_steps``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from ..config import SRLoRAConfig
from .paper import GLUE_HPARAMS

METHODS = ("lora", "pissa", "srlora")

# SRLoRAConfig fields that a runner sets itself, never from an option.
RUNNER_OWNED = ("total_steps", "switch_interval", "adapter_name", "svd_device", "seed")
# Every other SRLoRAConfig field is an option of every runner (the same name); a new field
# of the config is one with no edit in the harness.
PASSTHROUGH = tuple(f.name for f in dataclasses.fields(SRLoRAConfig) if f.name not in RUNNER_OWNED)
# The options a run always records, resolved to their values (the first runs' set: a run
# records another option only where it differs from the config's default).
SRLORA_OPTIONS = (
    "r_target",
    "gamma",
    "beta1",
    "beta2",
    "optimizer_reset",
    "reset_scores",
    "direction_policy",
    "entry_scale",
    "svd_method",
    "adaptive_switch",
    "adaptive_patience",
)
# The harness's own default where SRLoRAConfig has none.
SRLORA_DEFAULTS: dict[str, Any] = {"r_target": 32}


@dataclass
class RunConfig:
    """Everything that defines one run; the CLI's options are these fields (and the
    :data:`SRLORA_OPTIONS` of ``SRLoRAConfig``)."""

    task: str = field(
        default="mr",
        metadata={
            "help": "Task: mr, mr-reg, imdb, fine-foods, digits, mnist, fashion-mnist, or GLUE "
            "sst2/mrpc/cola/qnli/rte/stsb."
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
    device: str = field(
        default="auto",
        metadata={"help": "Where to train: 'cpu', 'cuda', 'cuda:1'...; 'auto': the GPU when there is one."},
    )
    srlora: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "SRLoRAConfig fields of the run (every field but the ones a runner sets itself)."},
    )

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}.")
        for name in ("max_steps", "batch_size", "max_length", "r", "eval_every", "image_size", "max_train", "max_eval"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")
        if self.warmup_steps < 0:
            raise ValueError(f"--warmup-steps must be >= 0, got {self.warmup_steps}.")
        for name in ("lr", "alpha"):
            if not getattr(self, name) > 0:  # also refuses NaN
                raise ValueError(f"--{name} must be > 0, got {getattr(self, name)}.")
        if not self.weight_decay >= 0:
            raise ValueError(f"--weight-decay must be >= 0, got {self.weight_decay}.")
        unknown = sorted(set(self.srlora) - set(PASSTHROUGH))
        if unknown:
            raise ValueError(f"RunConfig.srlora: unknown options {unknown}; a run may set {list(PASSTHROUGH)}.")
        if self.srlora.get("subspace_whiten"):
            raise ValueError(
                "--subspace-whiten needs text the model should keep knowing, and srlora train has none: use "
                "srlora absorb (CorDA's general text), or SRLoRA(model, config, run_model=fn) in your own loop."
            )
        # Normalised (the recorded options' values, the others' where not at the default), so
        # that two configs are equal exactly when they describe the same run (resume compares them).
        resolved = self.srlora_config()
        defaults = SRLoRAConfig.__dataclass_fields__
        others = {n: getattr(resolved, n) for n in PASSTHROUGH if n not in SRLORA_OPTIONS and n in self.srlora}
        self.srlora = {name: getattr(resolved, name) for name in SRLORA_OPTIONS} | {
            n: v for n, v in others.items() if v != defaults[n].default
        }
        if self.method == "srlora":
            resolved.budget(self.r)  # r_target / gamma / r must leave room for a switch

    def srlora_config(self) -> SRLoRAConfig:
        """The run's ``SRLoRAConfig``: its options, ``total_steps = max_steps``."""
        return SRLoRAConfig(**{**SRLORA_DEFAULTS, **self.srlora, "total_steps": self.max_steps})

    @classmethod
    def from_flat(cls, values: dict[str, Any]) -> RunConfig:
        """Build from one flat mapping in which the SRLoRA options sit beside the others
        (as on the command line and in the presets)."""
        srlora = {k: values[k] for k in PASSTHROUGH if k in values}
        return cls(**{k: v for k, v in values.items() if k not in PASSTHROUGH}, srlora=srlora)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
for _task, (_rt, _epochs, _bs, _lr) in GLUE_HPARAMS.items():
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
    """The preset's values, then ``overrides`` (flat); ``epochs`` becomes ``max_steps``."""
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
