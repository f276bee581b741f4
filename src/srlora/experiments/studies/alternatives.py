"""Against the alternatives a user would pick where LoRA's rank binds: full fine-tuning, GaLore,
PEFT's knowledge-keeping initialisations (CorDA in its knowledge-preserved mode, MiCA, LoRA-GA)
and LoRA's own ladder, on the absorption task (:mod:`srlora.experiments.absorb`), with the
trainable-state memory of every run.

    srlora study --part alternatives-screen   # seed 1: every method's learning-rate sweep

Every method is tuned the same way: a 3-point learning-rate sweep on seed 1 (held-out chunks
decide), the adapters at r = 2 included (LoRA, PiSSA and SRLoRA ran at 5e-4, chosen once, before).
GaLore's update is ``lr x scale x`` its projected Adam step (no weight decay), so its learning
rate and scale are one knob: the sweep moves the learning rate at galore-torch's scale 0.25.
"""

from __future__ import annotations

import dataclasses

from ..absorb import AbsorbConfig
from ..jobs import run_jobs
from .absorption import STEPS, AbsorbJob
from .new_pairs.jobs import BEST, VARIANTS

# The adapters' learning rate before this study (chosen once): its runs keep their names.
ADAPTER_LR = 5e-4
# 3 points each, 2.5x apart around the value a user would try first.
SWEEPS: dict[str, tuple[float, ...]] = {
    "full": (1e-5, 3e-5, 1e-4),
    "galore": (1e-4, 3e-4, 1e-3),
    "adapter": (2e-4, ADAPTER_LR, 1.25e-3),
}
GALORE_INTERVAL = 40  # GaLore refreshes its subspace as often as SRLoRA switches (INTERVAL)


def config(method: str, r: int, lr: float, seed: int) -> tuple[str, AbsorbConfig]:
    """The run name and configuration of ``method`` at rank ``r`` (GaLore's rank; full fine-tuning
    has none) and learning rate ``lr``."""
    if method == "srlora":
        cfg = dataclasses.replace(VARIANTS[BEST][0], lr=lr, seed=seed)
        name = BEST
    elif method == "full":
        cfg, name = AbsorbConfig("full", r, steps=STEPS, lr=lr, seed=seed), "full"
    elif method == "galore":
        cfg = AbsorbConfig("galore", r, switch_interval=GALORE_INTERVAL, steps=STEPS, lr=lr, seed=seed)
        name = f"galore-r{r}"
    else:
        cfg, name = AbsorbConfig(method, r, steps=STEPS, lr=lr, seed=seed), f"{method}-r{r}"
    if method in ("full", "galore") or lr != ADAPTER_LR:
        name += f"-lr{lr:g}"
    return name, cfg


def screen_jobs(seed: int = 1) -> list[AbsorbJob]:
    """Seed 1, r = 2: every method's sweep, the points a user tries first ahead of the others."""
    order: list[tuple[str, float]] = []
    for i in (1, 0, 2):  # middle points first: a sweep's edges only matter if the middle is not best
        order += [("full", SWEEPS["full"][i]), ("galore", SWEEPS["galore"][i])]
        order += [(m, SWEEPS["adapter"][i]) for m in ("lora", "srlora", "corda", "mica", "lora_ga", "pissa")]
    return [AbsorbJob(*config(method, 2, lr, seed)) for method, lr in order]


PARTS = {
    "alternatives-screen": lambda root, seeds, ns: run_jobs(screen_jobs(seeds[0]), ns.jobs, root),
}
