"""What SRLoRA costs against plain PEFT LoRA: the per-step benchmarks this study runs
(``benchmarks/step_overhead.py``, ``srlora study --part perf``), and the sections written from
the JSON files other benchmark commands put into ``docs/results`` (each names its command):
SRLoRA's initialisation at LLM scale (``benchmarks/llm_init.py``), QLoRA
(``benchmarks/qlora_overhead.py``), a whole run against LoRA with the batched switch
(``benchmarks/run_overhead.py``) and the GPU runs (``scripts/gpu_check.sh``,
``scripts/gpu_study.py``, kept in ``docs/results/gpu``). A section whose file is missing is
left out.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ...atomic import atomic_write_json
from ..rundata import RenderContext, Section

PERF = [
    # (name, options of benchmarks/step_overhead.py)
    ("minilm-rt64", ["--r-target", "64", "--steps", "20"]),
    ("minilm-rt16", ["--r-target", "16", "--steps", "6"]),
    ("minilm-rt128", ["--r-target", "128", "--steps", "6"]),
    ("minilm-rt256", ["--r-target", "256", "--steps", "6"]),
    ("base-rt64", ["--base-size", "--r-target", "64", "--steps", "5"]),
    ("base-rt256", ["--base-size", "--r-target", "256", "--steps", "2"]),
]


def run_perf(root: Path) -> None:
    """The step-overhead benchmarks of :data:`PERF`, each once (kept when measured earlier)."""
    out = root / "runs/study/perf"
    out.mkdir(parents=True, exist_ok=True)
    for name, opts in PERF:
        path = out / f"{name}.json"
        if path.is_file():
            print(f"perf {name}: measured earlier, kept ({path})", file=sys.stderr)
            continue
        cmd = [sys.executable, "benchmarks/step_overhead.py", *opts, "--json", str(path)]
        print("$ python " + shlex.join(cmd[1:]), file=sys.stderr)
        started = time.perf_counter()
        subprocess.run(cmd, cwd=root, check=True)
        data = json.loads(path.read_text())
        data["command"] = "python " + shlex.join(cmd[1:-2])
        data["benchmark_wall_s"] = time.perf_counter() - started
        atomic_write_json(path, data)


def section_perf(root: Path) -> list[str]:
    perf_dir = root / "runs/study/perf"
    steps = {name: opts[opts.index("--steps") + 1] for name, opts in PERF}
    files = [perf_dir / f"{name}.json" for name, _ in PERF]
    rows = {path.stem: json.loads(path.read_text()) for path in files if path.is_file()}
    if not rows:
        return ["## Performance", "", "(not run yet)", ""]
    any_row = next(iter(rows.values()))
    md = [
        "## Performance (SRLoRA against PEFT LoRA, same process)",
        "",
        f"`benchmarks/step_overhead.py`, batch {any_row['batch']}, r={any_row['r']}, "
        f"run alone on {any_row['machine']}.",
        "Step times are medians of steps that alternate between the models; `control` is a second,",
        "identical PEFT LoRA model in the same rotation, so `control / LoRA` is this machine's noise",
        "floor for the ratio. `own work` is SRLoRA's per-step importance update timed on its own,",
        "and `own-work ratio` = (LoRA step + own work) / LoRA step. The base-size model is a BERT-base",
        "shaped encoder with random weights: no base-size checkpoint can be fetched here, and these",
        "costs depend on shapes, not values.",
        "",
        "| model | layers | r_target | timed steps | LoRA step ms | SRLoRA step ms | SRLoRA / LoRA "
        "| control / LoRA | SRLoRA / control | own work ms | own-work ratio | switch ms | SVD init full s "
        "| randomized s | SVD cache MiB |",
        "|" + "---|" * 15,
    ]
    for name, d in rows.items():
        model = "BERT-base shapes" if name.startswith("base") else "MiniLM"
        md.append(
            f"| {model} | {d['layers']} | {d['r_target']} | {steps[name]} | "
            f"{d['step_s_lora'] * 1e3:.0f} | {d['step_s_srlora'] * 1e3:.0f} | "
            f"{d['ratio_of_medians']:.3f} | {d['control_ratio']:.3f} | "
            f"{d['step_s_srlora'] / d['step_s_control']:.3f} | "
            f"{d['importance_update_s'] * 1e3:.2f} | "
            f"{d['ratio_from_own_work']:.4f} | {d['switch_s'] * 1e3:.0f} | {d['init_s_full']:.2f} | "
            f"{d['init_s_randomized']:.2f} | {d['svd_cache_bytes'] / 2**20:.1f} |"
        )
    md += ["", "Commands:", "", "```", *[f"{d.get('command', '')}" for d in rows.values()], "```", ""]
    return md


def _load(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def section_gpu(root: Path) -> list[str]:
    folder = root / "docs/results/gpu"
    bert, decoder = _load(folder / "gpu_check_bert_base.json"), _load(folder / "gpu_check_decoder_1b.json")
    study = folder / "gpu_study.md"
    if bert is None and decoder is None and not study.is_file():
        return []
    md = [
        "## On a GPU (one NVIDIA H200)",
        "",
        "`bash scripts/gpu_check.sh` (the CUDA tests, `benchmarks/gpu_syncs.py`, and `benchmarks/step_overhead.py`",
        "in bf16 on random BERT-base and 1B-decoder shapes, SRLoRA and PEFT LoRA in rotation in one process)",
        "and `python scripts/gpu_study.py` ran once each on one NVIDIA H200 (torch 2.11.0+cu130, transformers",
        "5.17.0, peft 0.21.0). Their whole output is in `docs/results/gpu/`.",
        "",
    ]
    rows = [("BERT-base shapes", bert), ("1B decoder shapes (Llama)", decoder)]
    if bert or decoder:
        md += [
            "| model | layers | batch | LoRA step ms | SRLoRA step ms | SRLoRA / LoRA | control / LoRA "
            "| own work ms | own-work ratio | switch ms | SVD init full / randomized s | SVD cache MiB |",
            "|" + "---|" * 12,
        ]
        for label, d in rows:
            if d is None:
                continue
            full = "n/a" if d["init_s_full"] != d["init_s_full"] else f"{d['init_s_full']:.2f}"  # NaN: not timed
            md.append(
                f"| {label} | {d['layers']} | {d['batch']} | {d['step_s_lora'] * 1e3:.1f} | "
                f"{d['step_s_srlora'] * 1e3:.1f} | {d['ratio_of_medians']:.3f} | {d['control_ratio']:.3f} | "
                f"{d['importance_update_s'] * 1e3:.2f} | {d['ratio_from_own_work']:.4f} | {d['switch_s'] * 1e3:.0f} | "
                f"{full} / {d['init_s_randomized']:.2f} | {d['svd_cache_bytes'] / 2**20:.1f} |"
            )
        md += [
            "",
            "`control / LoRA` is the noise floor (a second, identical PEFT LoRA model in the rotation); `own work`",
            "is SRLoRA's per-step importance update timed alone. Device-to-host syncs per step outside switches",
            "(`benchmarks/gpu_syncs.py`, BERT-base shapes, 72 layers): PEFT LoRA 0.00, SRLoRA 1.00 with either",
            "direction policy. The CUDA tests: 8 of 9 passed; the ninth failed on a schedule warning of the test",
            "itself (an interval below the EMA warm-up), since fixed. A test added afterwards found a switch",
            "costing about 17 device syncs per layer (blocking copies of slot indices to the device); those copies",
            "are non-blocking now, and that test has not run on a GPU since.",
            "",
        ]
    if study.is_file():
        text = study.read_text().splitlines()
        body = [line for line in text[1:] if not line.startswith("Seeds per variant")]
        md += [
            "### The paper regime at paper scale (2,000 steps, r_target = 256)",
            "",
            "From `docs/results/gpu/gpu_study.md`. Twelve runs shared the GPU at a time, so the `wall s / run`",
            "column measures that crowding, not SRLoRA's cost: an SRLoRA run syncs the host with the device at",
            "every switch of every layer (62 switches x 36 layers here), and every sync waits for the GPU's time",
            "slices among twelve processes. Run two at a time (one LoRA, one SRLoRA, seed 1 on `mr`), the same",
            "runs took 62.4 s and 74.1 s, ratio 1.19 with the SVD init and all 62 switches included. The",
            "mr-reg SRLoRA runs of seed 3 did not start before the script's deadline.",
            "",
            *[line.replace("## ", "#### ") if line.startswith("## ") else line for line in body],
            "",
        ]
    return md


def section_llm_init(root: Path) -> list[str]:
    d = _load(root / "docs/results/llm_init.json")
    if d is None:
        return []
    md = [
        "## SRLoRA's initialisation at LLM scale",
        "",
        f"`python benchmarks/llm_init.py --r-target {d['r_target']} --json docs/results/llm_init.json`",
        f"on {d['machine']} (this project's CPU machine): random weights with the shapes of a 1B and a 7B",
        "Llama (q, k, v, o, gate, up, down adapted in every block), one layer at a time. Each distinct shape was timed",
        "(the randomized SVD three times, the full SVD once) and the model's total extrapolated from the number",
        "of layers of each shape: an extrapolation from a sample, not a timed end-to-end init.",
        "",
        "| model | adapted layers | randomized SVD init | full SVD init | SVD cache | model, bf16 | cache / model |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, m in d["models"].items():
        full = m.get("init_s_full_extrapolated")
        md.append(
            f"| {name} | {m['layers']} | {m['init_s_randomized_extrapolated'] / 60:.1f} min | "
            f"{'n/a' if full is None else f'{full / 60:.1f} min'} | {m['svd_cache_bytes'] / 2**30:.2f} GiB | "
            f"{m['model_bf16_bytes'] / 2**30:.1f} GiB | {m['cache_over_model_bf16']:.1%} |"
        )
    md += [
        "",
        'With `svd_device="cpu"` the cache stays in host memory and the accelerator holds only the model; a',
        "switch then moves its `r'` directions per layer to the device.",
        "",
    ]
    return md


def section_qlora(root: Path) -> list[str]:
    """The QLoRA benchmark's figures (``docs/results/qlora.json``, SmolLM2 shapes, and
    ``qlora_7b.json``, 7B shapes), and the earlier layout for comparison."""
    small, big = _load(root / "docs/results/qlora.json"), _load(root / "docs/results/qlora_7b.json")
    if small is None or "start" not in small:
        return []
    mib = 2**20
    md = [
        "## QLoRA: SRLoRA on a 4-bit base",
        "",
        "Random weights quantized to NF4; SRLoRA's memory in bytes its tensors actually hold, at the start and after",
        "every layer has used its whole budget; a training step's peak from the profiler's memory timeline (CPU);",
        "step times of PEFT QLoRA, an identical second PEFT QLoRA (the A/A control) and SRLoRA in rotation.",
        "",
        "| | SmolLM2-135M shapes | 7B shapes |",
        "|---|---|---|",
    ]
    runs = [d for d in (small, big) if d is not None and "start" in d]

    def row(label: str, fn) -> str:  # type: ignore[no-untyped-def]
        cells = [fn(d) for d in runs] + ["-"] * (2 - len(runs))
        return f"| {label} | " + " | ".join(cells) + " |"

    def cmd(d: dict[str, Any]) -> str:
        name = "qlora.json" if d["shapes"] == "smollm2" else "qlora_7b.json"
        shapes = "" if d["shapes"] == "smollm2" else f" --shapes 7b --blocks {d['blocks']}"
        return f"`python benchmarks/qlora_overhead.py{shapes} --steps {d['steps']} --json docs/results/{name}`"

    def ratio(d: dict[str, Any], key: str, when: str) -> str:
        return f"{d[when][key] / mib:.1f} MiB ({d[when][key] / d['weights_4bit_bytes']:.2f}x)"

    md += [
        row("command", cmd),
        row("machine", lambda d: d["machine"]),
        row("adapted layers, r, r_target", lambda d: f"{d['layers']}, {d['r']}, {d['r_target']}"),
        row("side factors' dtype", lambda d: d["side_dtype"]),
        row("4-bit weights of the adapted layers", lambda d: f"{d['weights_4bit_bytes'] / mib:.1f} MiB"),
        row("side factors at the start", lambda d: ratio(d, "side", "start")),
        row("side factors after the whole budget", lambda d: ratio(d, "side", "end")),
        row("least side factors for an exact output, whole budget", lambda d: ratio(d, "least_side", "end")),
        row("importance EMAs (fixed)", lambda d: ratio(d, "ema", "end")),
        row("SVD cache", lambda d: f"{d['end']['cache'] / mib:.1f} MiB, on {d['end']['cache_device']}"),
        row(
            "a training step's peak, SRLoRA at r_target / PEFT QLoRA",
            lambda d: f"{d['step_peak_bytes']['srlora'] / mib:.0f} / {d['step_peak_bytes']['qlora'] / mib:.0f} MiB",
        ),
        row(
            "step time ratio before any switch (A/A control)",
            lambda d: f"{d['ratio']:.3f} ({d['control_ratio']:.3f})" if "ratio" in d else "not timed",
        ),
        row(
            "step time ratio, every layer at r_target (A/A control)",
            lambda d: (
                f"{d['ratio_at_r_target']:.3f} ({d['control_ratio_at_r_target']:.3f})" if "ratio" in d else "not timed"
            ),
        ),
        "",
        "Before this layout (float32 side factors allocated for the whole budget at construction, a second copy",
        "of the entered pairs, the SVD cache beside the weights; `benchmarks/qlora_overhead.py --steps 12` at commit",
        "0b6c301, SmolLM2 shapes): side factors 139.7 MiB, SVD cache 74.6 MiB against 57.0 MiB of 4-bit weights",
        "(3.8x together), step time ratio at r_target 1.301 (control 0.993).",
        "",
    ]
    return md


def section_switch_cost(root: Path) -> list[str]:
    """The batched switch against the layer-by-layer one, whole runs against PEFT LoRA
    (``docs/results/run_overhead.json``, written by ``benchmarks/run_overhead.py --layer-by-layer``)."""
    d = _load(root / "docs/results/run_overhead.json")
    if d is None or "switch_of_all_layers" not in d:
        return []
    a = d["args"]
    flags = " --minilm-shapes" if a.get("minilm_shapes") else (" --base-size" if a.get("base_size") else "")
    cmd = (
        f"python benchmarks/run_overhead.py{flags} --steps {a['steps']} --r-target {a['r_target']} "
        f"--rounds {a['rounds']} --layer-by-layer --json docs/results/run_overhead.json"
    )
    sw = d["switch_of_all_layers"]
    batched, single = sw["batched"], sw["layer_by_layer"]
    lbl = d.get("ratio_layer_by_layer_to_lora")
    source = "MiniLM (all-MiniLM-L6-v2, the cached asset)" if d["source"].endswith("/minilm") else d["source"]
    md = [
        "## A whole run against PEFT LoRA: the batched switch",
        "",
        f"`{cmd}` on {d['machine']}, {d['threads']} threads, torch {d['torch']} ({d['device']}), {source},",
        f"{a['steps']} steps of {a['batch_size']} x {a['seq_len']}, r = {a['r']}, r_target = {a['r_target']}. Each run",
        "builds its adapter on a fresh copy of the base (SRLoRA: the SVD and PiSSA init included) and trains the",
        "same batches; an identical second LoRA run is the A/A control; rounds alternate the order. Before: every",
        "layer switching on its own (the path before the batched switch, still used by FSDP2, ZeRO and quantized",
        "layers); after: layers of one shape switching together (stacked caches, batched products, `_foreach` writes).",
        "",
        "| | layer by layer (before) | batched (after) |",
        "|---|---|---|",
        f"| one switch of all {batched['layers']} layers: ATen ops | {single['aten_ops']} | {batched['aten_ops']} "
        f"({batched['groups']} switch groups; layer by layer {single['groups']}) |",
        f"| one switch of all layers: wall ms (median of forced switches) | {1e3 * single['switch_s']:.1f} | "
        f"{1e3 * batched['switch_s']:.1f} |",
    ]
    if lbl is not None:
        md += [
            f"| a switch step over a plain step, in the runs: ms | "
            f"{1e3 * d['switch_step_extra_s_layer_by_layer']:.1f} | {1e3 * d['switch_step_extra_s']:.1f} |",
            f"| whole run, SRLoRA / LoRA (A/A control {d['ratio_control']:.3f}) | {lbl:.3f} | "
            f"{d['ratio_srlora_to_lora']:.3f} |",
        ]
    md += [
        "",
        f"SRLoRA's init (SVD of every layer, PiSSA split): {d['srlora_init_s']:.2f} s per run. On this CPU the",
        "whole-run ratios sit inside the machine's noise (compare the A/A control); the op count is what the",
        "batching changes: `tests/test_switch_batch.py` asserts that a switch of 12 and of 36 layers in 3 shape",
        "groups dispatches the same number of ATen ops and no syncing op. The GPU goals (a whole MiniLM run at",
        "paper scale within 1.05 of LoRA, BERT-base shapes within 1.03) were not measured: no GPU was lent;",
        "`scripts/gpu_check.sh` runs this benchmark at paper scale where one is. Before the batched switch, on",
        "an H200: 69 ms per switch of 72 BERT-base-shaped layers, 104 ms for 112 1B-decoder layers (next section).",
        "",
        "The initialisation was not batched: on this CPU a batched `torch.linalg.svd` over the stacked weights",
        "of one shape was bit-identical to the per-layer SVDs and no faster, and the randomized SVD of a wide",
        "weight's transpose was not faster either; the per-layer loop stays (measured during development, not",
        "by a committed benchmark).",
        "",
    ]
    return md


PARTS = {"perf": lambda root, seeds, ns: run_perf(root)}


def _perf(ctx: RenderContext) -> list[str]:
    have_perf = any((ctx.root / "runs/study/perf" / f"{name}.json").is_file() for name, _ in PERF)
    return ctx.keep(section_perf(ctx.root), have_perf)


# The doc's places this study writes (srlora.experiments.studies.DOC_ORDER puts them in order).
SECTIONS: dict[str, Section] = {
    "perf": _perf,
    "llm-init": lambda ctx: section_llm_init(ctx.root),
    "qlora": lambda ctx: section_qlora(ctx.root),
    "switch-cost": lambda ctx: section_switch_cost(ctx.root),
    "gpu": lambda ctx: section_gpu(ctx.root),
}


def row_sources() -> dict[tuple[str, str | None], dict[str, tuple[str, str]]]:
    """This study's run-table rows built from ``srlora train`` runs: none."""
    return {}
