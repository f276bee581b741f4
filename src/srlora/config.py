"""The one configuration object of SRLoRA.

Every field carries its help text in ``metadata["help"]`` so that the command line
and the docs reuse it (as PEFT's ``LoraConfig`` does). Validation that needs only the
config itself happens in ``__post_init__``; validation that needs the model (``r``,
layer shapes) happens when :class:`srlora.SRLoRA` is built.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import torch

from .errors import check_choice, check_int

OptimizerReset = Literal["seed", "zero", "none"]
ScoreReset = Literal["recycled", "all"]
SVDMethod = Literal["full", "randomized"]
DirectionPolicy = Literal["spectrum", "gradient", "gradient_subspace"]
SideFactorDType = Literal["bfloat16", "float16", "float32"]

# entry_scale under direction_policy="gradient_subspace" where none is given: the measured safe
# scale (1.0 broke training in the paper's regime; docs/RESULTS.md, "What enters at a switch").
SUBSPACE_ENTRY_SCALE = 0.25
FirstPairs = Literal["pissa", "lora"]


@dataclass(frozen=True)
class SwitchBudget:
    """What one layer may explore (see :meth:`SRLoRAConfig.budget`).

    Attributes:
        r: trainable pairs (the LoRA rank).
        r_prime: pairs recycled per switch, ``gamma r``.
        directions: singular directions the layer may use, ``min(r_target, m, n)``.
        num_switches: ``N_switch = floor((directions - r) / r')``.
        clamped: ``directions < r_target`` (a layer narrower than ``r_target``).
        cached: the top singular triplets of ``W0`` the layer keeps: ``directions`` where new
            pairs are ``W0``'s directions; under ``gradient_subspace`` the first ``r`` pairs'
            and the ``subspace_exclude`` directions left alone.
    """

    r: int
    r_prime: int
    directions: int
    num_switches: int
    clamped: bool = False
    cached: int = 0  # triplets of W0's SVD the layer keeps (0: directions)

    def __post_init__(self) -> None:
        if self.cached == 0:
            object.__setattr__(self, "cached", self.directions)  # frozen


@dataclass
class SRLoRAConfig:
    """Hyper-parameters of SRLoRA (see ``docs/METHOD.md`` for the math).

    Exactly one of ``total_steps`` (the schedule is derived from it, paper Eq. 13-14)
    or ``switch_interval`` (a fixed interval) must normally be given; giving both uses
    the interval and stops switching before ``total_steps``. Each field's full help text is
    in its ``metadata["help"]`` (the ``srlora`` command and docs/API.md show it).

    Args:
        r_target (required): Largest number of singular directions of W0 that one layer may
            explore (the paper's r_target); more than the LoRA rank r.
        gamma (default 0.5): Fusion ratio: the fraction of the r pairs recycled at each
            switch, r' = gamma * r (a whole number).
        beta1 (default 0.85): EMA coefficient of the sensitivity |w * grad| (paper Eq. 4).
        beta2 (default 0.85): EMA coefficient of the sensitivity's uncertainty (paper Eq. 5).
        total_steps (default None): Total number of optimizer steps N_all, from which the
            switch interval follows; 'auto': an integration supplies it when training starts.
        switch_interval (default None): Switch every this many optimizer steps (when the
            total number of steps is not known).
        adaptive_switch (default False): Switch a layer once the set of its r' lowest-scoring
            pairs has settled (the paper's future work), within the same budget.
        adaptive_patience (default 10): Steps the lowest-scoring set must stay the same
            before an adaptive switch.
        optimizer_reset (default 'seed'): The optimizer state of recycled pairs: 'seed'
            (moments zeroed, Adam's second moment seeded from the entry's next gradient),
            'zero' (moments zeroed), 'none'.
        direction_policy (default 'spectrum'): What a switch brings in: W0's next singular
            directions ('spectrum', the paper's), the unused ones best aligned with the
            gradient ('gradient'), or the gradient's own top singular vectors
            ('gradient_subspace').
        entry_scale (default None): The singular value a new pair enters with, as a multiple
            of the layer's first pairs'; None: its W0 direction's own (under
            'gradient_subspace': 0.25, the measured safe scale).
        sketch_oversample (default 8): 'gradient_subspace': columns the gradient's range
            sketch keeps beyond r'.
        first_pairs (default 'pissa'): What the slots hold before the first switch: W0's top
            r directions ('pissa') or PEFT's own start ('lora'; with 'gradient_subspace').
        subspace_exclude (default 0): 'gradient_subspace': W0's top k singular directions
            are projected out of the captured gradient, so no new pair moves along them.
        subspace_whiten (default 0): 'gradient_subspace': the captured gradient whitened along
            the top k directions of a general text's input covariance (SRLoRA(run_model=...)).
        reset_scores (default 'recycled'): Whose importance EMAs a switch resets: the
            'recycled' pairs or 'all'.
        svd_method (default 'full'): 'full' (torch.linalg.svd) or 'randomized'
            (torch.svd_lowrank of the top r_target triplets).
        svd_niter (default 4): Subspace iterations of the randomized SVD.
        svd_oversample (default 16): Extra columns the randomized SVD samples beyond
            r_target.
        svd_device (default None): Where the SVD cache lives (None: beside each weight; a
            quantized base's waits on the CPU).
        side_factor_dtype (default 'bfloat16'): Storage dtype of a quantized base's side
            factors.
        fused_records (default True): Keep the fused and entered pairs (float32); False: the
            same training without them, export_lora(base=the original model).
        seed (default 0): Seed of the randomized SVD and sketches (the same on every rank).
        adapter_name (default 'default'): The PEFT adapter to turn into SRLoRA.
    """

    r_target: int = field(
        metadata={
            "help": "Largest number of singular directions of W0 that one layer may explore "
            "(the paper's r_target). Must exceed the LoRA rank r; clamped per layer to min(m, n)."
        }
    )
    gamma: float = field(
        default=0.5,
        metadata={
            "help": "Fusion ratio: the fraction of the r pairs recycled at each switch, "
            "r' = gamma * r (must be a whole number)."
        },
    )
    beta1: float = field(
        default=0.85,
        metadata={"help": "EMA coefficient of the sensitivity |w * grad| (paper Eq. 4)."},
    )
    beta2: float = field(
        default=0.85,
        metadata={"help": "EMA coefficient of the sensitivity's uncertainty (paper Eq. 5)."},
    )
    total_steps: int | Literal["auto"] | None = field(
        default=None,
        metadata={
            "help": "Total number of optimizer steps N_all; the switch interval is "
            "floor(N_all / N_switch) with N_switch = floor((r_target - r) / r'). 'auto': an integration "
            "(Trainer, Lightning) supplies it when training starts."
        },
    )
    switch_interval: int | None = field(
        default=None,
        metadata={"help": "Switch every this many optimizer steps (use when the total number of steps is not known)."},
    )
    adaptive_switch: bool = field(
        default=False,
        metadata={
            "help": "Adaptive schedule (the paper's future work): switch a layer once the set of its r' "
            "lowest-scoring pairs has not changed for adaptive_patience steps, no sooner than the EMA warm-up "
            "(19 steps at beta 0.85) and no later than twice the fixed interval after its last switch; same "
            "r_target budget, no switch at or after the last step."
        },
    )
    adaptive_patience: int = field(
        default=10,
        metadata={"help": "Steps the lowest-scoring set must stay the same before an adaptive switch."},
    )
    optimizer_reset: OptimizerReset = field(
        default="seed",
        metadata={
            "help": "What happens to the optimizer state of recycled pairs. 'seed' (default): Adam moments "
            "and SGD momentum are zeroed at the switch, and Adam's second moment is seeded from the "
            "entry's own gradient at its next step, so its first step is not ~3x too large; "
            "'zero': moments zeroed only (the plain reset); 'none': left as they are."
        },
    )
    direction_policy: DirectionPolicy = field(
        default="spectrum",
        metadata={
            "help": "Which unused singular directions of W0 a switch brings in. 'spectrum' (the paper's): the next "
            "ones in singular-value order. 'gradient': the r' unused ones i (among the top r_target) with the largest "
            "|u_i^T G v_i|, G the layer's full-weight gradient averaged (EMA, beta1) over the 19 steps (at beta1 "
            "0.85) before each switch, captured by hooks only in that window. 'gradient_subspace': not W0's "
            "directions: the top r' singular vectors of G summed over that window (LoRA-GA's initialisation at every "
            "switch), from a randomized sketch of G built by the same hooks (docs/METHOD.md section 7)."
        },
    )
    entry_scale: float | None = field(
        default=None,
        metadata={
            "help": "Singular value sigma a new pair enters with (s B_new A_new = sigma u v^T). None: the paper's, the "
            "singular value of its W0 direction, smaller at every switch on a decaying spectrum; under "
            "'gradient_subspace', whose pairs have no W0 value, None means 0.25 (set on the config). A number c: c "
            "times the mean of the layer's top r singular values, the scale of its first pairs. Along the gradient, "
            "measured (docs/RESULTS.md, 'What enters at a switch'): 1.0 learns most and forgets most, and broke "
            "training in the paper's regime (mr at chance); 0.25 learns as much as LoRA r = 8 on absorption and ties "
            "LoRA in the paper's regime."
        },
    )
    sketch_oversample: int = field(
        default=8,
        metadata={
            "help": "'gradient_subspace': columns the gradient's range sketch keeps beyond r' (k = r' + this; the "
            "co-range sketch has 2k + 1 rows)."
        },
    )
    first_pairs: FirstPairs = field(
        default="pissa",
        metadata={
            "help": "What the r slots hold before the first switch. 'pissa' (the paper's): W0's top r singular "
            "directions, W holding the residual. 'lora': the adapter as PEFT built it (B = 0, A random: LoRA's "
            "start; W untouched, so nothing of W0 moves until training moves it); with 'gradient_subspace' only, "
            "whose entries do not count W0's directions."
        },
    )
    subspace_exclude: int = field(
        default=0,
        metadata={
            "help": "'gradient_subspace': leave W0's top k singular directions alone: they are projected out of the "
            "captured gradient on both sides before its top vectors are taken, so no new pair moves along the "
            "directions W0 uses most (0: off; the SVD cache keeps max(r, k) triplets)."
        },
    )
    subspace_whiten: int = field(
        default=0,
        metadata={
            "help": "'gradient_subspace': new pairs that lower the loss most per unit of output change on general "
            "text (CorDA's aim, at every switch): the captured gradient is whitened along the top k directions of "
            "the input covariance of text the model should keep knowing, which SRLoRA(model, config, run_model=fn) "
            "collects once by running fn (0: off; not with subspace_exclude)."
        },
    )
    reset_scores: ScoreReset = field(
        default="recycled",
        metadata={"help": "Whose importance EMAs are reset at a switch: 'recycled' pairs only, or 'all' pairs."},
    )
    svd_method: SVDMethod = field(
        default="full",
        metadata={
            "help": "'full': exact torch.linalg.svd (as PEFT's 'pissa' init); 'randomized': "
            "torch.svd_lowrank for the top r_target triplets, faster when r_target << min(m, n)."
        },
    )
    svd_niter: int = field(
        default=4,
        metadata={"help": "Subspace iterations of the randomized SVD."},
    )
    svd_oversample: int = field(
        default=16,
        metadata={"help": "Extra columns sampled by the randomized SVD beyond r_target."},
    )
    svd_device: str | None = field(
        default=None,
        metadata={
            "help": "Where the SVD cache lives ('cpu' keeps it off the accelerator); None: beside each layer's weight, "
            "except on a quantized base, where it waits on the CPU (a switch moves the directions it needs)."
        },
    )
    side_factor_dtype: SideFactorDType = field(
        default="bfloat16",
        metadata={
            "help": "Storage dtype of a quantized base's side factors (the pairs fused into W and those that entered "
            "the slots, kept beside the never-written 4/8-bit weight). 'bfloat16': half the memory of float32; pairs "
            "enter the slots rounded to it (so the entered record is exact) and a switch changes the layer's output by "
            "the bfloat16 rounding of the fused pairs (below 2^-7 of their contribution). 'float32': exact switches."
        },
    )
    fused_records: bool = field(
        default=True,
        metadata={
            "help": "Keep a float32 record of the pairs fused into W and of those that entered the slots (up to 2 x "
            "r_target x (m + n) numbers per layer), so that the total update is known without W0. False: the same "
            "training without their memory; export_lora then takes the original model (base=). A quantized base "
            "needs them."
        },
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the randomized SVD (the same seed gives the same directions on every rank)."},
    )
    adapter_name: str = field(
        default="default",
        metadata={"help": "The PEFT adapter to turn into SRLoRA; other adapters are left untouched."},
    )

    def __post_init__(self) -> None:
        check_int("r_target", self.r_target, minimum=1)
        if isinstance(self.gamma, bool) or not isinstance(self.gamma, (int, float)):
            raise TypeError(f"gamma must be a number in (0, 1], got {self.gamma!r}.")
        if not (0.0 < self.gamma <= 1.0) or math.isnan(self.gamma):
            raise ValueError(f"gamma must lie in (0, 1] (the fraction of pairs recycled per switch), got {self.gamma}.")
        for name in ("beta1", "beta2"):
            value = getattr(self, name)
            if not (0.0 <= value < 1.0):
                raise ValueError(f"{name} must lie in [0, 1) (an EMA coefficient), got {value}.")
        if self.total_steps is None and self.switch_interval is None:
            raise ValueError(
                "SRLoRA needs a schedule: give total_steps=N (the number of optimizer steps; the paper's "
                "interval floor(N / N_switch) is derived from it), switch_interval=K (switch every K steps), "
                "or total_steps='auto' when a Trainer/Lightning callback supplies N."
            )
        if self.total_steps is not None and self.total_steps != "auto":
            check_int("total_steps", self.total_steps, minimum=1)
        if self.switch_interval is not None:
            check_int("switch_interval", self.switch_interval, minimum=1)
        check_choice("optimizer_reset", self.optimizer_reset, get_args(OptimizerReset))
        check_choice("reset_scores", self.reset_scores, get_args(ScoreReset))
        check_choice("svd_method", self.svd_method, get_args(SVDMethod))
        check_choice("direction_policy", self.direction_policy, get_args(DirectionPolicy))
        if self.entry_scale is not None:
            if isinstance(self.entry_scale, bool) or not isinstance(self.entry_scale, (int, float)):
                raise TypeError(f"entry_scale must be a positive number or None, got {self.entry_scale!r}.")
            if not (0.0 < self.entry_scale < math.inf):
                raise ValueError(
                    f"entry_scale must be a positive finite number (a multiple of the first pairs' singular value), "
                    f"got {self.entry_scale}; None keeps the paper's scale."
                )
        if self.entry_scale is None and self.direction_policy == "gradient_subspace":
            # The gradient's pairs have no singular value of W0 to enter with: the measured safe scale.
            self.entry_scale = SUBSPACE_ENTRY_SCALE
        check_int("sketch_oversample", self.sketch_oversample, minimum=0)
        check_int("subspace_exclude", self.subspace_exclude, minimum=0)
        check_int("subspace_whiten", self.subspace_whiten, minimum=0)
        check_choice("first_pairs", self.first_pairs, get_args(FirstPairs))
        if self.first_pairs != "pissa" and self.direction_policy != "gradient_subspace":
            raise ValueError(
                f"first_pairs={self.first_pairs!r} leaves W0's top directions out of the slots, where the "
                f"{self.direction_policy!r} policy counts them as entered: use it with "
                f"direction_policy='gradient_subspace', or keep first_pairs='pissa'."
            )
        shaping = [
            f"{k}={v}"
            for k, v in (("subspace_exclude", self.subspace_exclude), ("subspace_whiten", self.subspace_whiten))
            if v
        ]
        if shaping and self.direction_policy != "gradient_subspace":
            raise ValueError(
                f"{' and '.join(shaping)} shapes the gradient's subspace: set "
                f"direction_policy='gradient_subspace' with it, or leave it at 0."
            )
        if len(shaping) > 1:
            raise ValueError(
                f"{' and '.join(shaping)}: one way to shape the gradient's subspace at a time; set the other to 0."
            )
        check_choice("side_factor_dtype", self.side_factor_dtype, get_args(SideFactorDType))
        if not isinstance(self.fused_records, bool):
            raise TypeError(f"fused_records must be True or False, got {self.fused_records!r}.")
        if not isinstance(self.adaptive_switch, bool):
            raise TypeError(f"adaptive_switch must be True or False, got {self.adaptive_switch!r}.")
        check_int("adaptive_patience", self.adaptive_patience, minimum=1)
        check_int("svd_niter", self.svd_niter, minimum=0)
        check_int("svd_oversample", self.svd_oversample, minimum=0)
        check_int("seed", self.seed, minimum=None)
        if not isinstance(self.adapter_name, str) or not self.adapter_name:
            raise ValueError(f"adapter_name must be a non-empty string, got {self.adapter_name!r}.")

    @property
    def entries_from_w0(self) -> bool:
        """New pairs are singular directions of ``W0`` (the SVD cache keeps ``r_target`` of them);
        ``False`` under ``direction_policy="gradient_subspace"`` (it keeps the top ``r`` only)."""
        return self.direction_policy != "gradient_subspace"

    @property
    def records_entries(self) -> bool:
        """What entered the slots is not ``U_J diag(S_J) V_J^T`` of the cache, so each layer keeps a
        record of it (the total update subtracts it)."""
        return self.entry_scale is not None or not self.entries_from_w0 or self.first_pairs != "pissa"

    def entry_sigma(self, top: torch.Tensor) -> float | None:
        """The singular value every new pair enters with, from the layer's top ``r`` singular values
        ``top``; ``None``: each pair's own (the paper's)."""
        if self.entry_scale is None:  # never under gradient_subspace (__post_init__ sets it)
            return None
        return float(self.entry_scale) * float(top.float().mean())

    def recycled_per_switch(self, r: int) -> int:
        """``r' = gamma * r``, the number of pairs fused and re-initialised per switch.

        Raises:
            ValueError: when ``gamma * r`` is not a whole number.
        """
        value = self.gamma * r
        rounded = round(value)
        if abs(value - rounded) > 1e-9 or rounded < 1:
            raise ValueError(
                f"gamma * r must be a whole number of pairs, but gamma={self.gamma} and r={r} give {value:g}. "
                f"Choose gamma as k / {r} for some k in 1..{r} (e.g. gamma={max(1, round(value)) / r:g})."
            )
        return int(rounded)

    def budget(self, r: int, width: int | None = None) -> SwitchBudget:
        """The switch budget of a layer of LoRA rank ``r`` and ``min(m, n) = width``: the one
        place where the rule "r_target must exceed r and leave room for a switch" lives.

        ``directions = min(r_target, width)``, ``r' = gamma r`` and
        ``N_switch = floor((directions - r) / r')``.

        Raises:
            ValueError: ``gamma r`` is not whole, ``r_target <= r`` or ``r_target`` leaves room
                for no switch, or ``r > width``. A layer narrower than ``r_target`` is not an
                error: its budget is clamped (``clamped`` is True), possibly to no switch at all.
        """
        check_int("r", r, minimum=1)
        r_prime = self.recycled_per_switch(r)
        if self.r_target <= r:
            raise ValueError(
                f"r_target ({self.r_target}) must be larger than the LoRA rank r ({r}): SRLoRA explores "
                f"r_target directions with r trainable ranks. Raise r_target or use plain PiSSA."
            )
        if (self.r_target - r) // r_prime < 1:
            raise ValueError(
                f"r_target={self.r_target} leaves room for no switch: each switch brings in r'={r_prime} new "
                f"directions beyond the first r={r}. Use r_target >= {r + r_prime}."
            )
        directions = self.r_target
        if width is not None:
            if r > width:
                raise ValueError(f"the LoRA rank r={r} exceeds min(m, n)={width} of the layer.")
            directions = min(self.r_target, width)
        return SwitchBudget(
            r=r,
            r_prime=r_prime,
            directions=directions,
            num_switches=(directions - r) // r_prime,
            clamped=directions < self.r_target,
            cached=directions
            if self.entries_from_w0
            else max(r, self.subspace_exclude if width is None else min(self.subspace_exclude, width)),
        )

    def differences(self, other: SRLoRAConfig, ignore: tuple[str, ...] = ()) -> list[str]:
        """``["field=mine (here theirs)", ...]`` for every field that differs from ``other``."""
        return [
            f"{f.name}={getattr(self, f.name)!r} (here {getattr(other, f.name)!r})"
            for f in dataclasses.fields(self)
            if f.name not in ignore and getattr(self, f.name) != getattr(other, f.name)
        ]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SRLoRAConfig:
        """The config :meth:`to_dict` wrote, by this version or an earlier one (a checkpoint's)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SRLoRAConfig fields {unknown}; known fields: {sorted(known)}.")
        if data.get("direction_policy") == "gradient_subspace" and data.get("entry_scale") is None:
            # Saved before None had a scale of its own under gradient_subspace: it meant 1.0 then.
            data = {**data, "entry_scale": 1.0}
        return cls(**data)
