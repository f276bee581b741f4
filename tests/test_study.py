"""The results study (``srlora study``): its commands are valid, its verdicts follow the
stated rule, and the doc it renders reports the runs it finds (and keeps the hand-written notes)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
from pathlib import Path

import pytest

from srlora.experiments import report
from srlora.experiments.cli import build_parser
from srlora.experiments.config import RunConfig
from srlora.experiments.jobs import Job
from srlora.experiments.options import run_values
from srlora.experiments.runs import config_digest
from srlora.experiments.stats import verdict
from srlora.experiments.studies import paper_regime, rank_bound, short
from srlora.experiments.studies.absorption import load_absorb
from srlora.schedule import ema_warmup_steps


def test_every_study_command_parses_and_its_schedule_is_valid():
    jobs = short.main_jobs([1, 2, 3]) + short.ablation_jobs([1, 2, 3])
    assert len({j.out for j in jobs}) == len(jobs), "two runs would share a folder"
    cfg_of = {}
    for job in jobs:
        cfg = cfg_of[job.out] = job.config()
        assert (cfg.task, cfg.method, cfg.seed, cfg.max_steps) == (job.task, job.method, job.seed, 150)
        if cfg.method == "srlora":
            assert cfg.srlora_config().budget(cfg.r).num_switches >= 1
    # The ablations change exactly the option they name.
    cfg = {j.cell: cfg_of[j.out].srlora for j in short.ablation_jobs([1])}
    default = cfg_of[next(j.out for j in short.main_jobs([1]) if j.cell == "mr" and j.method == "srlora")].srlora
    changed = {cell: {k for k in default if options[k] != default[k]} for cell, options in cfg.items()}
    assert changed == {
        "mr-reset-zero": {"optimizer_reset"},
        "mr-reset-none": {"optimizer_reset"},
        "mr-gamma0.25": {"gamma"},
        "mr-gamma1.0": {"gamma"},
        "mr-rtarget64": {"r_target"},
        "mr-scores-all": {"reset_scores"},
    }
    assert cfg["mr-reset-none"]["optimizer_reset"] == "none" and cfg["mr-gamma0.25"]["gamma"] == 0.25


def test_verdict_is_a_two_standard_error_rule():
    se = math.sqrt(0.01**2 / 3 + 0.01**2 / 3)
    assert verdict((0.80, 0.01, 3), (0.80 - 1.9 * se, 0.01, 3), True).startswith("tie")
    assert verdict((0.80, 0.01, 3), (0.80 - 2.1 * se, 0.01, 3), True).startswith("win")
    assert verdict((0.80, 0.01, 3), (0.80 - 2.1 * se, 0.01, 3), False).startswith("loss")
    assert verdict((0.80, 0.01, 1), (0.70, 0.01, 3), True).startswith("n/a")


def _fake_run(root: Path, job: Job, acc: float, early: float) -> None:
    out = root / job.out
    out.mkdir(parents=True)
    final = {"step": 150, "eval_loss": 0.5, "accuracy": acc, "f1": acc}
    results = {
        "task": job.task,
        "method": job.method,
        "seed": job.seed,
        "steps": 4,
        "final": final,
        "headline_metric": "accuracy",
        "early_train_loss": early,
        "final_train_loss": 0.4,
        "trainable_params": 1000,
        "wall_s": 60.0,
        "interrupted": False,
    }
    config_bytes = json.dumps(job.config().to_dict()).encode()
    (out / "config.json").write_bytes(config_bytes)
    (out / "results.json").write_text(json.dumps({**results, "config_sha256": config_digest(config_bytes)}))
    (out / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": early / s}) + "\n" for s in range(1, 5)))


def test_render_reports_the_runs_and_keeps_the_notes(tmp_path):
    (tmp_path / "docs").mkdir()
    accs = {"lora": [0.70, 0.71, 0.72], "pissa": [0.70, 0.70, 0.70], "srlora": [0.80, 0.81, 0.82]}
    for job in short.main_jobs([1, 2, 3]):
        if job.cell == "mr":
            _fake_run(tmp_path, job, accs[job.method][job.seed - 1], 0.6)
    path = report.render([1, 2, 3], tmp_path)
    text = path.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| SRLoRA | 3 |"))
    assert f"{statistics.fmean(accs['srlora']):.3f} ± {statistics.stdev(accs['srlora']):.3f}" in row
    assert "| mr | SRLoRA vs LoRA | win" in text and "| mr | SRLoRA vs PiSSA | win" in text
    assert "### imdb\n\n(not run yet)" in text
    assert (tmp_path / "docs/results/mr_loss.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "docs/results/runs.json").read_text())) == 9

    # The commands the doc gives for longer runs parse, and the 2,000-step ones can run.
    commands = [line.split()[1:] for line in text.splitlines() if line.startswith("srlora compare ")]
    assert len(commands) == len(short.TASKS) + 6
    for argv in commands:
        ns = build_parser().parse_args(argv)
        if ns.preset == "quick":
            cfg = RunConfig.from_flat(run_values(ns, None))
            srl = cfg.srlora_config()
            num_switches = srl.budget(cfg.r).num_switches
            assert cfg.max_steps // num_switches >= ema_warmup_steps(srl.beta1)  # t_interval above the warm-up

    notes = "SRLoRA wins here, by hand."
    path.write_text(text.replace(report.NOTES_BEGIN + "\n", report.NOTES_BEGIN + "\n" + notes + "\n"))
    assert notes in report.render([1, 2, 3], tmp_path).read_text()


def test_render_long_pairs_by_seed_and_applies_the_default_rule(tmp_path):
    (tmp_path / "docs").mkdir()
    # Per-seed accuracies: gradient beats spectrum by 0.02 +- 0.001 on every task (a tight
    # paired interval), while spectrum - LoRA varies in sign across seeds.
    base = {1: 0.70, 2: 0.75, 3: 0.80}
    offset = {"lora": 0.0, "pissa": 0.001, "srlora": 0.0}
    jobs = paper_regime.long_jobs([1, 2, 3]) + rank_bound.rank_jobs([1, 2, 3])
    for job in jobs:
        acc = base[job.seed] + offset.get(job.method, 0.0) + (0.02 + 0.001 * job.seed if "gradient" in job.cell else 0)
        if job.method == "srlora" and "gradient" not in job.cell:
            acc += (-0.002, 0.002, 0.0)[job.seed - 1]
        _fake_run(tmp_path, job, acc, 0.6)
    text = report.render([1, 2, 3], tmp_path).read_text()
    assert "## 600 steps, paper regime" in text and "## 600 steps, rank-bound regime" in text
    row = next(line for line in text.splitlines() if line.startswith("| SRLoRA gradient − SRLoRA spectrum |"))
    d = [0.02 + 0.001 * s - (-0.002, 0.002, 0.0)[s - 1] for s in (1, 2, 3)]
    assert f"{statistics.fmean(d):+.3f} [" in row
    assert 'Measured: 3 win(s), 0 loss(es) over 3 task(s): the default is `"gradient"`.' in text
    assert len(json.loads((tmp_path / "docs/results/runs.json").read_text())) == len(jobs)

    # Rendered again where the runs are gone, the 600-step sections keep their text.
    import shutil

    shutil.rmtree(tmp_path / "runs")
    again = report.render([1, 2, 3], tmp_path).read_text()
    assert "Measured: 3 win(s)" in again and row in again


def test_gap_closed_is_reported_only_for_a_gap_beyond_the_noise():
    from srlora.experiments.studies.rank_bound import gap_closed

    def runs(accs: list[float]) -> list[dict]:
        return [{"seed": s, "final": {"accuracy": a}} for s, a in enumerate(accs, 1)]

    clear = {"LoRA r=2": runs([0.80, 0.81, 0.82]), "LoRA r=8": runs([0.90, 0.91, 0.92])}
    clear["SRLoRA r=2 spectrum"] = runs([0.85, 0.86, 0.87])
    text = " ".join(gap_closed(clear))
    assert "closes 50% of it" in text
    noisy = {"LoRA r=2": runs([0.80, 0.90, 0.85]), "LoRA r=8": runs([0.90, 0.80, 0.86])}
    noisy["SRLoRA r=2 spectrum"] = runs([0.85, 0.86, 0.87])
    text = " ".join(gap_closed(noisy))
    assert "does not exclude 0" in text and "closes" not in text


def test_render_shows_each_rank_task_with_runs_beyond_its_pilot(tmp_path):
    (tmp_path / "docs").mkdir()
    for job in rank_bound.rank_pilot_jobs([1, 2, 3]):
        _fake_run(tmp_path, job, 0.70, 0.6)
    text = report.render([1, 2, 3], tmp_path).read_text()
    assert "## 600 steps, rank-bound regime: fashion-mnist" in text  # the chosen task: its pilot
    assert "## 600 steps, rank-bound regime: mr\n" not in text  # a pilot run alone is no section
    for job in rank_bound.rank_jobs([1, 2, 3], "mr"):
        if not (tmp_path / job.out).exists():
            _fake_run(tmp_path, job, 0.70 + 0.01 * job.seed + (0.05 if "r8" in job.cell else 0.0), 0.6)
    text = report.render([1, 2, 3], tmp_path).read_text()
    assert "## 600 steps, rank-bound regime: mr\n" in text
    assert "`srlora study --part rank --rank-task mr`" in text
    assert "Gap between LoRA at r = 8 and at r = 2: +0.053 [" in text  # seed 1: the pilot run, 0.70
    assert "--r 8 --alpha 8 --out runs/study/rank-mr-r8/lora/seed3" in text  # its commands are listed


def test_absorption_gap_closed_names_every_rank_2_method():
    """Each rank-2 method (SRLoRA's names carry their schedule) gets its share of the LoRA
    r = 2 -> r = 32 gap; LoRA r = 2 itself and the wider LoRA do not."""
    from srlora.experiments.studies.absorption import METRICS, gap_closed

    def run(value: float) -> dict:
        return {"train_loss_tail": value, "evals": [{key: value for key, _ in METRICS if key != "train_loss_tail"}]}

    by_name = {
        "lora-r2": {1: run(3.0)},
        "lora-r32": {1: run(2.0)},
        "pissa-r2": {1: run(2.5)},
        "srlora-r2-T40-g1": {1: run(2.25)},
    }
    lines = gap_closed(by_name)
    assert any(line.startswith("- pissa-r2:") and "50%" in line for line in lines)
    assert any(line.startswith("- srlora-r2-T40-g1:") and "75%" in line for line in lines)
    assert not any(line.startswith(("- lora-r2:", "- lora-r32:")) for line in lines)


def test_render_keeps_each_rank_task_section_whole_when_only_another_tasks_runs_are_here(tmp_path):
    """Both rank-bound sections rendered, the runs gone (runs/ is not committed), then only
    mr-reg's runs back (its pilot run among them): fashion-mnist's section keeps its whole text
    (not a pilot table alone), mr-reg's is rendered afresh, and neither appears twice."""
    import shutil

    (tmp_path / "docs").mkdir()
    jobs = (
        rank_bound.rank_pilot_jobs([1, 2, 3])
        + rank_bound.rank_jobs([1, 2, 3])
        + rank_bound.rank_jobs([1, 2, 3], "mr-reg")
    )
    for job in {j.out: j for j in jobs}.values():
        _fake_run(tmp_path, job, 0.70 + 0.01 * job.seed + (0.05 if "r8" in job.cell else 0.0), 0.6)
    first = report.render([1, 2, 3], tmp_path).read_text()
    fm_title, mr_title = "## 600 steps, rank-bound regime: fashion-mnist", "## 600 steps, rank-bound regime: mr-reg"

    def section(text: str, title: str) -> str:
        start = text.index(title + "\n")
        return text[start : text.index("\n## ", start + 1)]

    shutil.rmtree(tmp_path / "runs")
    for job in {j.out: j for j in rank_bound.rank_jobs([1, 2, 3], "mr-reg")}.values():
        _fake_run(tmp_path, job, 0.70 + 0.01 * job.seed + (0.05 if "r8" in job.cell else 0.0), 0.6)
    again = report.render([1, 2, 3], tmp_path).read_text()
    assert again.count(fm_title + "\n") == 1 and again.count(mr_title + "\n") == 1
    assert section(again, fm_title) == section(first, fm_title)
    assert section(again, mr_title) == section(first, mr_title)
    # The commands of every run are listed once: those here and those in runs.json.
    n = len({j.out for j in jobs})
    assert first.count("### Commands of the 600-step runs") == again.count("### Commands of the 600-step runs") == 1
    assert f"\n{n} runs, " in first and f"\n{n} runs, " in again


def test_a_part_run_on_one_seed_renders_every_documented_seed(tmp_path):
    """``srlora study --part long --seeds 1`` runs seed 1's jobs, but the document it rewrites
    keeps the rows and commands of seeds 2 and 3 (the render is over DOC_SEEDS too)."""
    from srlora.experiments.study import DOC_SEEDS, run_parts

    ns = build_parser().parse_args(["study", "--part", "render", "--seeds", "1", "--root", str(tmp_path)])
    seeds, root = run_parts(ns)
    assert seeds == sorted(DOC_SEEDS) and root == tmp_path.resolve()
    ns = build_parser().parse_args(["study", "--part", "render", "--seeds", "4", "--root", str(tmp_path)])
    assert run_parts(ns)[0] == sorted({*DOC_SEEDS, 4})


def test_the_new_pairs_goal_table_measures_against_seed_1s_ladder():
    """Gap closed = (LoRA r=2 - x) / (LoRA r=2 - LoRA r=32) on held-out chunks; excess prose =
    prose - the ladder's prose linearly interpolated at the same chunk loss (seed 1's ladder)."""
    from srlora.experiments.studies.new_pairs import section

    def run(chunks: float, prose: float) -> dict:
        return {"evals": [{"held_chunks": chunks, "prose": prose}]}

    ladder = {"lora-r2": {1: run(2.6, 4.4)}, "lora-r8": {1: run(2.4, 4.6)}, "lora-r32": {1: run(2.2, 4.7)}}
    best = {1: run(2.4, 4.65), 2: run(2.32, 4.64)}  # 50%, +0.05; 70%, on the ladder (4.7 - 0.1 * 0.6)
    md = section._goal_table({**ladder, "pissa-r2": {1: run(2.5, 4.6)}, "x": best}, "x")
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in md[2:]]
    assert rows[0] == ["x", "1", "2.400", "50%", "+0.050"]
    assert rows[1] == ["x", "2", "2.320", "70%", "+0.000"]
    assert rows[2][1:] == ["mean of 2", "", "60%", "+0.025"]
    assert rows[3] == ["pissa-r2", "1", "2.500", "25%", "+0.100"]


def test_the_alternatives_screen_shows_every_run_with_its_memory_and_marks_each_methods_best(tmp_path):
    from srlora.experiments.studies import alternatives

    entries = []
    for job in [j for j in alternatives.screen_jobs() if j.config.method in ("full", "lora")]:
        lr = job.config.lr
        final = {"step": 400, "held_chunks": 2.0 + lr * 100, "held_docs": 2.5, "prose": 4.2, "news": 4.1}
        entries.append(
            {
                "out": str(job.out),
                "name": job.name,
                "config": dataclasses.asdict(job.config),
                "evals": [{**final, "step": 0, "held_chunks": 2.9}, final],
                "memory": {"trainable_state_bytes": 3 * 2**20},
                "wall_s": 1500.0,
            }
        )
    (tmp_path / "docs/results").mkdir(parents=True)
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    md = "\n".join(alternatives.section(tmp_path))
    screen = md.split("### The screen")[1].split("\n### ")[0]
    full_rows = [line for line in screen.splitlines() if line.startswith("| full-lr")]
    assert len(full_rows) == 3 and "| 3.0 |" in full_rows[0]  # every point, its memory in MiB
    best = [line for line in full_rows if "**" in line]
    assert len(best) == 1 and best[0].startswith("| full-lr1e-05 |")  # the lowest held-out chunk loss
    against = md.split("### Each run against LoRA's curve")[1].split("\n### ")[0]
    assert "| full-lr3e-05 | 3.0 | 2.003 |" in against and "| lora-" not in against  # every method but LoRA
    assert alternatives.TITLE in md and "news" in md


def test_the_rank_users_pick_runs_each_method_at_its_best_rate_and_one_neighbour(tmp_path):
    """Point 5: r = 16 from each method's complete r = 2 sweep (its best learning rate and the
    point below it, or above where the best is the lowest); a method whose sweep is missing a
    point waits; SRLoRA runs without records (the same training), its chosen entry and each
    confirmed option, each from its own sweep (the option's grew below its lowest point)."""
    from srlora.experiments.studies import alternatives

    held = {("lora", 2e-4): 2.5, ("lora", 5e-4): 2.4, ("lora", 1.25e-3): 2.45}
    held |= {("srlora", 2e-4): 2.35, ("srlora", 5e-4): 2.3, ("srlora", 1.25e-3): 2.6, ("pissa", 5e-4): 2.5}
    held |= {("srlora-w32", 8e-5): 2.5, ("srlora-w32", 2e-4): 2.4, ("srlora-w32", 5e-4): 2.45}
    held |= {("srlora-w32", 1.25e-3): 2.7}
    entries = []
    for (method, lr), chunks in held.items():
        name, cfg = alternatives.config(method, 2, lr, 1)
        final = {"held_chunks": chunks}
        entries.append({"name": name, "config": dataclasses.asdict(cfg), "evals": [final]})
    (tmp_path / "docs/results").mkdir(parents=True)
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    results = load_absorb(tmp_path)
    assert alternatives.best_lr(results, "lora") == 5e-4 and alternatives.best_lr(results, "pissa") is None
    jobs = {job.name: job.config for job in alternatives.rank_jobs(tmp_path)}
    assert set(jobs) == {
        "lora-r16-lr0.0005",
        "lora-r16-lr0.0002",
        "srlora-r16-T40-g1-gsub-s0.25-no-records-lr0.0002",
        "srlora-r16-T40-g1-gsub-s0.25-no-records-lr0.0005",
        "srlora-r16-T40-g1-gsub-s0.25-w32-no-records-lr0.0002",  # the confirmed option, at its own best
        "srlora-r16-T40-g1-gsub-s0.25-w32-no-records-lr8e-05",
    }
    srlora = jobs["srlora-r16-T40-g1-gsub-s0.25-no-records-lr0.0002"]
    assert (srlora.r, srlora.r_target, srlora.srlora) == (16, 160, {"fused_records": False})
    assert srlora.srlora_config().fused_records is False and jobs["lora-r16-lr0.0005"].r == 16
    whitened = jobs["srlora-r16-T40-g1-gsub-s0.25-w32-no-records-lr8e-05"]
    assert whitened.srlora == {"subspace_whiten": 32, "fused_records": False} and whitened.r == 16


def test_a_sweep_whose_best_is_an_end_grows_past_it_before_its_best_counts(tmp_path):
    """A method whose best point is its sweep's highest (or lowest) gets one more point beyond
    it, at the sweep's own ratio, at most EXTENSIONS of them; its best counts (for r = 16 and
    the confirmation) only once those have run; the screen lists them first and shows their rows."""
    from srlora.experiments.studies import alternatives

    def entry(method: str, lr: float, chunks: float) -> dict:
        name, cfg = alternatives.config(method, 2, lr, 1)
        final = {"held_chunks": chunks, "held_docs": chunks, "prose": 4.5, "news": 4.0}
        return {
            "name": name,
            "config": dataclasses.asdict(cfg),
            "evals": [final],
            "memory": {"trainable_state_bytes": 2**20},
        }

    entries = [entry("full", lr, 3.0 - lr * 1e3) for lr in alternatives.SWEEPS["full"]]  # best: the highest
    entries += [entry("lora", lr, 2.0 + lr * 1e3) for lr in alternatives.SWEEPS["adapter"]]  # best: the lowest
    entries += [entry("pissa", lr, 2.5 - (lr == 5e-4)) for lr in alternatives.SWEEPS["adapter"]]  # the middle

    def check(full: tuple, lora: tuple, best: dict) -> None:
        (tmp_path / "docs/results").mkdir(parents=True, exist_ok=True)
        (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
        results = load_absorb(tmp_path)
        assert alternatives.sweep(results, "full") == full and alternatives.sweep(results, "lora") == lora
        assert alternatives.sweep(results, "pissa") == alternatives.SWEEPS["adapter"]
        assert {m: alternatives.best_lr(results, m) for m in best} == best
        names = [job.name for job in alternatives.screen_jobs(1, results)]
        assert len(names) == len(set(names)) and {f"full-lr{lr:g}" for lr in full} <= set(names)
        assert {f"lora-r2-lr{lr:g}" for lr in lora} <= set(names)
        grown = [f"full-lr{lr:g}" for lr in full[3:]] + [f"lora-r2-lr{lr:g}" for lr in lora[: len(lora) - 3]]
        assert sorted(names[: len(grown)]) == sorted(grown)  # the grown points lead: each may grow again

    check((1e-5, 3e-5, 1e-4, 3e-4), (8e-5, 2e-4, 5e-4, 1.25e-3), {"full": None, "lora": None, "pissa": 5e-4})
    assert _standings(tmp_path) == [  # each method's best so far, where its sweep stands, best first
        ("PiSSA", "0.0005", "complete"),
        ("LoRA", "0.0002", "to run: 8e-05"),
        ("full fine-tuning", "0.0001", "to run: 0.0003"),
    ]
    entries += [entry("full", 3e-4, 2.9), entry("lora", 8e-5, 2.3)]  # both worse than the old end
    check((1e-5, 3e-5, 1e-4, 3e-4), (8e-5, 2e-4, 5e-4, 1.25e-3), {"full": 1e-4, "lora": 2e-4})
    entries[-2:] = [entry("full", 3e-4, 2.0), entry("lora", 8e-5, 1.0)]  # both better: one more each
    check((1e-5, 3e-5, 1e-4, 3e-4, 9e-4), (3.2e-5, 8e-5, 2e-4, 5e-4, 1.25e-3), {"full": None, "lora": None})
    entries += [entry("full", 9e-4, 1.0), entry("lora", 3.2e-5, 0.5)]  # the ends again: no third point
    check((1e-5, 3e-5, 1e-4, 3e-4, 9e-4), (3.2e-5, 8e-5, 2e-4, 5e-4, 1.25e-3), {"full": 9e-4, "lora": 3.2e-5})
    screen = "\n".join(alternatives.section(tmp_path)).split("### The screen")[1].split("\n### ")[0]
    assert "| full-lr0.0009 |" in screen and "| lora-r2-lr3.2e-05 |" in screen  # the added points' rows
    assert _standings(tmp_path) == [  # an end after both growths is said to be one
        ("LoRA", "3.2e-05", "at its edge after 2 growths"),
        ("full fine-tuning", "0.0009", "at its edge after 2 growths"),
        ("PiSSA", "0.0005", "complete"),
    ]


def _standings(root: Path) -> list[tuple[str, str, str]]:
    """The alternatives section's standings table: (method, best lr, its sweep), row by row."""
    from srlora.experiments.studies import alternatives

    table = "\n".join(alternatives.section(root)).split("### Where each method stands")[1].split("\n### ")[0]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    return [(cells[0].removeprefix("| "), cells[1], cells[2]) for cells in rows[1:]]


def test_lora_s_curve_is_read_between_the_runs_around_it():
    from srlora.experiments.studies.alternatives import curve_at

    def run(chunks: float, prose: float) -> dict:
        return {"evals": [{"held_chunks": chunks, "prose": prose}]}

    lora = [run(2.6, 4.4), run(2.2, 4.6), run(2.4, 4.55)]  # in no order
    assert curve_at(lora, 2.5, "prose") == pytest.approx(4.475)  # halfway from 2.6 to 2.4
    assert curve_at(lora, 2.3, "prose") == pytest.approx(4.575)
    assert curve_at(lora, 2.1, "prose") is None and curve_at(lora, 2.5, "news") is None  # outside, no text


def test_a_method_s_learning_at_a_forgetting_budget_is_read_along_its_sweep():
    from srlora.experiments.studies.alternatives import at_budget

    path = [(2.8, 4.40), (2.6, 4.50), (2.3, 4.70)]  # (held-out chunks, forgetting) by learning rate
    best, open_ = at_budget(path, 4.60)  # crosses halfway between the last two runs
    assert best == pytest.approx(2.45) and not open_
    assert at_budget(path, 4.80) == (2.3, True)  # the top rate within budget: a higher one may learn more
    assert at_budget(path, 4.35) is None  # even the lowest rate forgets more
    wild = [(2.5, 4.5), (2.2, 4.8), (2.3, 5.4)]  # the top rate learns less and forgets more
    assert at_budget(wild, 4.6)[0] == pytest.approx(2.4)
    assert at_budget(wild, 5.0) == (2.2, False)  # a run beats the later crossing (2.233)
    diverged = [*path, (math.nan, math.nan)]  # a higher rate diverged: over every budget
    assert at_budget(diverged, 4.80) == (2.3, False) and at_budget(diverged, 4.60)[0] == pytest.approx(2.45)


def test_the_budget_table_compares_every_method_at_the_same_forgetting(tmp_path):
    from srlora.experiments.studies import alternatives

    untrained = {"held_chunks": 3.3, "held_docs": 3.0, "prose": 4.30, "news": 4.30}

    def entry(method: str, lr: float, chunks: float, forgetting: float) -> dict:
        name, cfg = alternatives.config(method, 2, lr, 1)
        final = {"held_chunks": chunks, "held_docs": chunks, "prose": forgetting, "news": forgetting}
        memory = {"trainable_state_bytes": 2**20}
        return {"name": name, "config": dataclasses.asdict(cfg), "evals": [untrained, final], "memory": memory}

    lrs = alternatives.SWEEPS["adapter"]
    entries = [entry("lora", lr, c, f) for lr, c, f in zip(lrs, (2.8, 2.6, 2.3), (4.38, 4.52, 4.70), strict=True)]
    entries += [entry("pissa", lr, c, f) for lr, c, f in zip(lrs, (2.7, 2.5, 2.4), (4.32, 4.36, 4.45), strict=True)]
    (tmp_path / "docs/results").mkdir(parents=True)
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    md = "\n".join(alternatives.section(tmp_path))
    table = md.split("### What each method learns at a forgetting budget")[1].split("\n### ")[0]
    lines = [line.strip("| ").split(" | ") for line in table.splitlines() if line.startswith("| ")]
    rows = {cells[0]: cells[2:] for cells in lines}  # method: its cells after the memory
    assert list(rows["method"]) == ["prose +0.05", "prose +0.1", "prose +0.2", "news +0.05", "news +0.1", "news +0.2"]
    assert rows["LoRA"] == ["over", "2.771", "2.629"] * 2  # its lowest rate forgets 0.08 already
    # 4.35 between 4.32 and 4.36, 4.40 between 4.36 and 4.45; at +0.2 its top rate is within budget
    assert rows["PiSSA"] == ["**2.550**", "**2.456**", "**2.400** (open)"] * 2


def test_each_method_is_confirmed_at_its_best_point_and_paired_by_seed_with_srlora(tmp_path):
    """alternatives-confirm: each method with a complete sweep at its best learning rate on
    every seed, SRLoRA's confirmed option at its own (its sweep grown below 2e-4); the table
    pairs SRLoRA's best with each method's by seed."""
    from srlora.experiments.studies import alternatives

    def entry(method: str, lr: float, seed: int, chunks: float) -> dict:
        name, cfg = alternatives.config(method, 2, lr, seed)
        final = {"held_chunks": chunks, "held_docs": chunks, "prose": 4.5, "news": 4.0}
        memory = {"trainable_state_bytes": 2**20}
        return {"name": name, "config": dataclasses.asdict(cfg), "evals": [final], "memory": memory}

    sweep = alternatives.SWEEPS["adapter"]
    entries = [
        entry(m, lr, 1, 2.5 - 0.1 * (lr == 5e-4) - 0.2 * (m == "srlora")) for m in ("lora", "srlora") for lr in sweep
    ]
    entries += [entry("srlora-w32", lr, 1, c) for lr, c in {8e-5: 2.45, 2e-4: 2.35, 5e-4: 2.4, 1.25e-3: 2.5}.items()]
    entries += [entry("pissa", lr, 1, 2.5 - 0.1 * (lr == 5e-4)) for lr in sweep]  # seed 1 alone: no pair
    (tmp_path / "docs/results").mkdir(parents=True)
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    jobs = alternatives.confirm_jobs(tmp_path, [1, 2, 3])
    runs = [(j.name, j.config.seed) for j in jobs]
    best = {m: alternatives.config(m, 2, 5e-4, 1)[0] for m in ("lora", "srlora", "srlora-w32", "pissa")}
    best["srlora-w32 at its best"] = alternatives.config("srlora-w32", 2, 2e-4, 1)[0]  # and at the old rate
    assert len(runs) == len(set(runs)) and set(runs) == {(name, s) for name in best.values() for s in (1, 2, 3)}
    assert {j.config.srlora.get("subspace_whiten") for j in jobs if "-w32-" in j.name} == {32}
    # SRLoRA's settings first, so that each other method's runs complete a paired row as they land
    mine = [name.startswith("srlora") for name, _ in runs]
    assert mine == sorted(mine, reverse=True) and mine.count(False) == 6
    paired_title = "3 seeds paired: SRLoRA − method"
    assert paired_title not in "\n".join(alternatives.section(tmp_path))  # SRLoRA on one seed: nothing to pair
    entries += [entry("lora", 5e-4, s, 2.4 + 0.01 * s) for s in (2, 3)]
    entries += [entry("srlora", 5e-4, s, 2.2 + 0.02 * s) for s in (2, 3)]
    entries += [entry("srlora-w32", 2e-4, s, 2.34 + 0.01 * s) for s in (2, 3)]
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    md = alternatives.section(tmp_path)
    text = "\n".join(md)
    # one table a SRLoRA setting: the chosen entry's, then the confirmed option's at its own best
    tables = {t.split(" − ")[0]: t for t in text.split("3 seeds paired: ")[1:]}
    assert set(tables) == {"SRLoRA", "SRLoRA w32"}
    assert "| PiSSA (" not in text.split("3 seeds paired: ")[1]  # one seed: the screen's row, no pair
    rows = [line for line in tables["SRLoRA"].split("\n### ")[0].splitlines() if line.startswith("| LoRA (")]
    # SRLoRA - LoRA by seed: 2.20 - 2.40, 2.24 - 2.42, 2.26 - 2.43: mean -0.183
    assert len(rows) == 1 and rows[0].startswith("| LoRA (0.0005; 1, 2, 3) | -0.183 [")
    # SRLoRA - its whitened option at the option's best: 2.20 - 2.35, 2.24 - 2.36, 2.26 - 2.37: -0.127
    what = alternatives.OPTIONS["w32"].what
    rows = [line for line in tables["SRLoRA"].split("\n### ")[0].splitlines() if line.startswith(f"| SRLoRA, {what} (")]
    assert len(rows) == 1 and rows[0].startswith(f"| SRLoRA, {what} (0.0002; 1, 2, 3) | -0.127 [")
    # the whitened option against the others: - LoRA 2.35 - 2.40, 2.36 - 2.42, 2.37 - 2.43: -0.057;
    # - the chosen entry: +0.127 (the same pairs, the other way)
    rows = tables["SRLoRA w32"].split("\n### ")[0].splitlines()
    assert next(r for r in rows if r.startswith("| LoRA (")).startswith("| LoRA (0.0005; 1, 2, 3) | -0.057 [")
    chosen = [r for r in rows if r.startswith("| SRLoRA (")]
    assert len(chosen) == 1
    assert chosen[0].startswith("| SRLoRA (gradient subspace, scale 0.25) (0.0005; 1, 2, 3) | +0.127 [")
    screen = "\n".join(md).split("### The screen")[1].split("\n### ")[0]  # its own sweep, its own best
    bold = [line.split("|")[1].strip() for line in screen.splitlines() if "**" in line]
    assert bold == [best["lora"], best["pissa"], best["srlora"], best["srlora-w32 at its best"]]


def test_a_confirmed_option_is_paired_by_seed_with_the_chosen_entry_and_against_loras_curve(tmp_path):
    """alternatives-confirm runs SRLoRA's confirmed options on every seed; the table pairs each
    with the chosen entry by seed and puts its prose loss against LoRA's curve of the same seed."""
    from srlora.experiments.studies import alternatives
    from srlora.experiments.studies.alternatives.jobs import CONFIRMED_OPTIONS
    from srlora.experiments.studies.new_pairs import BEST

    (tag,) = CONFIRMED_OPTIONS
    option = next(j for j, t in zip(alternatives.option_jobs(), alternatives.OPTIONS, strict=True) if t == tag)
    jobs = alternatives.confirm_jobs(tmp_path, [1, 2, 3])
    assert [(j.name, j.config.seed) for j in jobs[:3]] == [(option.name, s) for s in (1, 2, 3)]

    def entry(name: str, seed: int, chunks: float, prose: float) -> dict:
        final = {"held_chunks": chunks, "held_docs": chunks, "prose": prose, "news": 4.0}
        config = {**dataclasses.asdict(option.config), "seed": seed}
        return {"name": name, "config": config, "evals": [final], "memory": {"trainable_state_bytes": 2**20}}

    entries = []
    for s in (1, 2, 3):
        entries += [entry("lora-r2", s, 2.6, 4.4), entry("lora-r8", s, 2.4, 4.6)]  # prose 4.5 at 2.5
        entries += [entry(BEST, s, 2.4 + 0.01 * s, 4.6), entry(option.name, s, 2.5, 4.5 - 0.01 * s)]
    name, cfg = alternatives.config("lora", 2, 5e-4, 1)  # one run of the screen: the section opens
    entries.append({**entry(name, 1, 2.6, 4.4), "config": dataclasses.asdict(cfg)})
    (tmp_path / "docs/results").mkdir(parents=True)
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    md = alternatives.section(tmp_path)
    (row,) = [line for line in md if line.startswith(f"| {alternatives.OPTIONS[tag].what} (1, 2, 3)")]
    cells = [c.strip() for c in row.split("|")[2:-1]]
    # chunks: 2.5 - (2.41, 2.42, 2.43) = +0.08; prose: (4.49, 4.48, 4.47) - 4.6 = -0.12; curve: -0.02
    assert cells[0].startswith("+0.080 [") and cells[1].startswith("-0.120 [") and cells[2].startswith("-0.020 [")


def test_a_committed_run_counts_as_finished_where_runs_is_gone(tmp_path):
    """runs/ need not outlive its machine: a job whose run is committed in docs/results/absorb.json
    with the same configuration, every evaluation set and the memory count does not run again;
    one committed under another configuration, or from before the second text, does."""
    from srlora.experiments.absorb import EVAL_SETS
    from srlora.experiments.studies import alternatives

    jobs = alternatives.screen_jobs()
    same, other, old = jobs[0], jobs[1], jobs[2]
    final = {"step": 400, **{key: 2.0 for key in EVAL_SETS}}

    def entry(job, evals: dict, **config) -> dict:
        cfg = dataclasses.replace(job.config, **config)
        return {
            "out": str(job.out),
            "name": job.name,
            "config": cfg.to_dict(),
            "evals": [dict(evals)],
            "memory": {"trainable_state_bytes": 1},
        }

    entries = [entry(same, final), entry(other, final, lr=other.config.lr * 2), entry(old, final)]
    del entries[2]["evals"][0]["news"]
    (tmp_path / "docs/results").mkdir(parents=True)
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    assert not (tmp_path / "runs").exists()
    assert [job.finished(tmp_path) for job in (same, other, old)] == [True, False, False]
    # the file changed (a run landed): read again, not the cached copy
    entries[1] = entry(other, final)
    (tmp_path / "docs/results/absorb.json").write_text(json.dumps(entries))
    assert other.finished(tmp_path)
