"""Corpus absorption where LoRA's rank is short (issue 20): SmolLM2-135M learning TRL's source.

    srlora study --part absorb          # the runs that are missing (~25 min each, two at a time)

Each run is one ``srlora absorb`` command (:mod:`srlora.experiments.absorb`, the runner),
into ``runs/absorb/<name>/seed<s>/``.
"""

from __future__ import annotations

import dataclasses
import shlex
from dataclasses import dataclass
from pathlib import Path

from ..absorb import AbsorbConfig, finished

STEPS = 400
# SRLoRA on this task, from the known-rank benchmark's rule (docs/RESULTS.md): the error falls
# with the number of pairs fused as long as each pair is trained for ~30 steps or more, so
# recycle both pairs (gamma = 1) every 40 steps: 9 switches, 18 pairs fused per layer.
SRLORA_INTERVAL = 40
SRLORA_GAMMA = 1.0


@dataclass
class AbsorbJob:
    """One absorption run of ``srlora study --part absorb``: ``srlora absorb`` with ``config``."""

    name: str
    config: AbsorbConfig

    @property
    def out(self) -> Path:
        return Path("runs/absorb") / self.name / f"seed{self.config.seed}"

    def argv(self) -> list[str]:
        defaults = AbsorbConfig()
        argv = ["absorb"]
        for f in dataclasses.fields(AbsorbConfig):
            value = getattr(self.config, f.name)
            if f.name in ("method", "r", "seed", "steps") or value != getattr(defaults, f.name):
                argv += [f"--{f.name.replace('_', '-')}", str(value)]
        return [*argv, "--threads", "1", "--out", str(self.out)]

    def command(self) -> str:
        return "srlora " + shlex.join(self.argv())

    def finished(self, root: Path) -> bool:
        return finished(root / self.out, self.config)


def absorb_jobs(seeds: list[int], pilot: bool = False) -> list[AbsorbJob]:
    """The pilot (LoRA r = 2 and r = 32, first seed: is the rank short?), then LoRA r = 8,
    and PiSSA, SRLoRA and LoRA at r = 2 on every seed (paired by seed: same data order)."""
    first = seeds[0]
    jobs = [
        AbsorbJob("lora-r2", AbsorbConfig("lora", 2, steps=STEPS, seed=first)),
        AbsorbJob("lora-r32", AbsorbConfig("lora", 32, steps=STEPS, seed=first)),
    ]
    if pilot:
        return jobs
    jobs.append(AbsorbJob("lora-r8", AbsorbConfig("lora", 8, steps=STEPS, seed=first)))
    # The same interval at gamma 0.5 (one pair per switch), first seed: what gamma = 1 adds.
    half = AbsorbConfig("srlora", 2, 2 + (STEPS - 1) // SRLORA_INTERVAL, switch_interval=SRLORA_INTERVAL, steps=STEPS)
    jobs.append(AbsorbJob(f"srlora-r2-T{SRLORA_INTERVAL}", dataclasses.replace(half, seed=first)))
    r_prime = round(2 * SRLORA_GAMMA)
    r_target = 2 + r_prime * ((STEPS - 1) // SRLORA_INTERVAL)
    for seed in seeds:
        jobs.append(AbsorbJob("pissa-r2", AbsorbConfig("pissa", 2, steps=STEPS, seed=seed)))
        srlora = AbsorbConfig(
            "srlora", 2, r_target, switch_interval=SRLORA_INTERVAL, gamma=SRLORA_GAMMA, steps=STEPS, seed=seed
        )
        jobs.append(AbsorbJob(f"srlora-r2-T{SRLORA_INTERVAL}-g{SRLORA_GAMMA:g}", srlora))
        if seed != first:
            jobs.append(AbsorbJob("lora-r2", AbsorbConfig("lora", 2, steps=STEPS, seed=seed)))
    return jobs
