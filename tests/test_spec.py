"""One resume scheme for every runner (srlora.experiments.spec): a run is identified by the
fields its runner's first version recorded, and by any later field only where it is set, so
that adding a field (an SRLoRAConfig option passed through) leaves every committed run valid."""

from __future__ import annotations

import json
from pathlib import Path

from srlora.experiments.absorb import AbsorbConfig
from srlora.experiments.known_rank import KnownRankRun

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"


def test_the_committed_known_rank_runs_keep_their_keys():
    rows = [json.loads(line) for line in (RESULTS / "new_pairs_known_rank.jsonl").read_text().splitlines()]
    assert rows and all(KnownRankRun(**r["spec"]).key == r["key"] for r in rows)


def test_a_later_field_counts_only_where_set():
    plain = AbsorbConfig("srlora", 2, 20, switch_interval=40, gamma=1.0, direction_policy="gradient_subspace")
    saved = plain.to_dict()
    assert "srlora" not in saved  # a run that sets no passed-through option records none
    assert AbsorbConfig(**saved).digest() == plain.digest()
    excluded = AbsorbConfig(**saved, srlora={"subspace_exclude": 32})
    assert excluded.digest() != plain.digest()
    assert excluded.srlora_config().subspace_exclude == 32
    # a field of the first runs counts even at its default: another r is another run
    assert AbsorbConfig("srlora", 2).digest() != AbsorbConfig("srlora", 4).digest()


def test_every_srlora_config_field_is_an_option_of_every_runner():
    """A new SRLoRAConfig field needs no edit in the harness: srlora absorb and srlora train
    take every field but those a runner sets itself."""
    import argparse
    import dataclasses

    from srlora import SRLoRAConfig
    from srlora.experiments import absorb
    from srlora.experiments.config import RUNNER_OWNED
    from srlora.experiments.options import add_run_options

    for add in (absorb.add_arguments, add_run_options):
        ap = argparse.ArgumentParser()
        add(ap)
        flags = {a.dest for a in ap._actions}
        missing = [
            f.name for f in dataclasses.fields(SRLoRAConfig) if f.name not in RUNNER_OWNED and f.name not in flags
        ]
        assert not missing, (add.__module__, missing)


def test_a_known_rank_run_passes_any_srlora_field_through():
    plain = KnownRankRun("srlora", 2, 16, steps=2000, interval=30, gamma=1.0, direction_policy="gradient_subspace")
    left_alone = KnownRankRun(**{**plain.__dict__, "srlora": [["subspace_exclude", 4]]})  # as read from JSON
    assert left_alone.srlora == (("subspace_exclude", 4),) and hash(left_alone) != hash(plain)
    assert left_alone.key != plain.key and "subspace_exclude=4" in left_alone.label()


def test_a_field_that_defaults_to_true_is_turned_off_by_its_no_option():
    """fused_records=True by default: --no-fused-records turns it off, on every runner and in the
    command a study writes for the run."""
    from srlora.experiments.cli import build_parser
    from srlora.experiments.config import RunConfig
    from srlora.experiments.options import run_values
    from srlora.experiments.studies.alternatives import option_jobs

    p = build_parser()
    train = p.parse_args(["train", "--task", "mr", "--method", "srlora", "--no-fused-records", "--out", "x"])
    assert RunConfig.from_flat(run_values(train, "quick")).srlora_config().fused_records is False
    plain = p.parse_args(["train", "--task", "mr", "--method", "srlora", "--out", "x"])
    assert RunConfig.from_flat(run_values(plain, "quick")).srlora_config().fused_records is True
    job = next(j for j in option_jobs() if j.config.srlora.get("fused_records") is False)
    absorb = p.parse_args(job.argv())
    assert "--no-fused-records" in job.argv() and absorb.fused_records is False
