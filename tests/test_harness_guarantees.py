"""The harness's guarantees: a checked asset cache swapped atomically, results bound to their
configuration, no silent overwrite, and bad input refused with one line naming the file or
flag, before any model is built. Each test names the case of issue 10 it reproduces."""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from conftest import glue_folder

from srlora.experiments import assets, runs
from srlora.experiments import tasks as data
from srlora.experiments.cli import main

TINY = ["--r", "4", "--alpha", "4", "--r-target", "8", "--batch-size", "8", "--max-eval", "32"]


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


# -------------------------------------------------------------- 2. the asset cache
def test_2_a_truncated_cached_file_is_refused_with_its_name(fake_cache, capsys):
    path = fake_cache / "vader" / "movieReviewSnippets_GroundTruth.txt"
    path.write_bytes(path.read_bytes()[:5000])  # what a crash during a copy leaves
    with pytest.raises(assets.AssetError, match=r"movieReviewSnippets_GroundTruth\.txt.*truncated or replaced"):
        data.load_task("mr")
    assert main(["train", "--task", "mr"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "srlora fetch vader --force" in err[0]


def test_2_a_same_size_replacement_is_caught_by_its_hash(fake_cache):
    path = fake_cache / "vader" / "movieReviewSnippets_GroundTruth.txt"
    text = path.read_bytes()
    path.write_bytes(text.replace(b"\t-", b"\t+"))  # every rating positive, same size
    with pytest.raises(assets.AssetError, match="sha256 differs"):
        data.load_task("mr")


def test_2_a_replaced_mnist_pickle_is_never_unpickled(tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    folder = tmp_path / "cache" / "mnist"
    folder.mkdir(parents=True)
    with gzip.open(folder / "mnist.pkl.gz", "wb") as fh:
        pickle.dump(_Payload(str(marker)), fh)
    # The attacker rewrites the manifest too: the hash pinned in the code still catches it.
    manifest = {"mnist.pkl.gz": {"size": (folder / "mnist.pkl.gz").stat().st_size, "sha256": "0" * 64}}
    (folder / ".srlora-manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setenv("SRLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(assets.AssetError):
        data.load_task("mnist")
    assert not marker.exists()
    # And the pickle reader itself accepts arrays only.
    import io

    blob = io.BytesIO()
    pickle.dump(_Payload(str(marker)), blob)
    with pytest.raises(pickle.UnpicklingError, match="arrays only"):
        data._ArraysOnly(io.BytesIO(blob.getvalue())).load()
    assert not marker.exists()


def test_2_a_cache_without_manifest_is_not_trusted(tmp_path, monkeypatch):
    folder = tmp_path / "cache" / "fine-foods"
    folder.mkdir(parents=True)
    (folder / "fine_foods.json").write_text('{"train": [], "test": []}')
    monkeypatch.setenv("SRLORA_CACHE", str(tmp_path / "cache"))
    with pytest.raises(assets.AssetError, match=r"no integrity manifest.*srlora fetch fine-foods --force"):
        assets.fetch("fine-foods")


def _fake_asset(tmp_path: Path, monkeypatch) -> assets.Asset:
    """An asset whose 'download' copies a local zip (a few files of 200 kB)."""
    archive = tmp_path / "pkg.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for i in range(4):
            zf.writestr(f"pkg/data{i}.txt", f"{i}\n" * 100_000)
    asset = assets.Asset(
        name="fake",
        description="test",
        client="pip",
        package="fake==1",
        sha256=assets.sha256_of(archive),
        extract=assets._extract_zip_folder("pkg/"),
    )
    monkeypatch.setitem(assets.ASSETS, "fake", asset)

    def download(a: assets.Asset, workdir: Path) -> Path:
        target = workdir / archive.name
        target.write_bytes(archive.read_bytes())
        return target

    monkeypatch.setattr(assets, "_download", download)
    monkeypatch.setenv("SRLORA_CACHE", str(tmp_path / "cache"))
    return asset


def test_3_a_forced_fetch_never_leaves_a_reader_without_the_folder(tmp_path, monkeypatch):
    asset = _fake_asset(tmp_path, monkeypatch)
    folder = assets.fetch("fake")
    reader = (
        "import sys, time\nfrom pathlib import Path\nfolder = Path(sys.argv[1]); ok = bad = 0\n"
        "end = time.time() + float(sys.argv[2])\n"
        "while time.time() < end:\n"
        "    try:\n"
        "        assert len((folder / 'data2.txt').read_bytes()) == 200000; ok += 1\n"
        "    except (OSError, AssertionError):\n"
        "        bad += 1\n"
        "print(ok, bad)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", reader, str(folder), "4"], stdout=subprocess.PIPE, text=True)
    fetches = 0
    while proc.poll() is None:
        assets.fetch("fake", force=True)
        fetches += 1
    ok, bad = map(int, proc.stdout.read().split())
    assert fetches >= 5 and ok > 100
    assert bad == 0
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["fake"]  # no swapped-out copy left
    assert asset.path.is_dir()


# -------------------------------------------------------------- 4. stale results
def test_4_resume_never_takes_a_result_of_another_configuration(tiny_model, fake_cache, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cmp"
    args = ["compare", "--model", str(tiny_model), *TINY, "--methods", "lora", "--out", str(out), "--eval-every", "4"]
    assert main([*args, "--max-steps", "4"]) == 0
    # A longer run is killed after it wrote its config.json, beside the 4-step results.
    monkeypatch.setattr(runs, "build_model", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main([*args, "--max-steps", "6"]) == 130
    monkeypatch.undo()
    monkeypatch.setenv("SRLORA_CACHE", str(fake_cache))
    monkeypatch.setitem(assets.ASSETS, "vader", dataclasses.replace(assets.ASSETS["vader"], files=None))
    capsys.readouterr()
    assert main([*args, "--max-steps", "6", "--resume"]) == 0
    assert "finished earlier" not in capsys.readouterr().err
    assert json.loads((out / "lora" / "seed1" / "results.json").read_text())["steps"] == 6


def test_4_a_result_beside_another_config_is_not_finished(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    cfg = runs.RunConfig(method="lora", max_steps=6)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))
    (run_dir / "results.json").write_text(json.dumps({"steps": 4, "config_sha256": "0" * 64}))
    assert runs.finished_run(run_dir, cfg) is None


# -------------------------------------------------------------- 5. no silent overwrite
@pytest.mark.filterwarnings("ignore:The switch interval:srlora.SRLoRAWarning")
def test_5_train_refuses_an_out_that_holds_a_run_unless_told(tiny_model, fake_cache, tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", str(tiny_model), *TINY, "--max-steps", "4", "--out", str(out)]
    assert main([*base, "--method", "srlora"]) == 0
    assert (out / "history.json").is_file()
    before = (out / "results.json").read_bytes()
    capsys.readouterr()
    assert main([*base, "--method", "lora"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "results.json").read_bytes() == before
    assert main([*base, "--method", "lora", "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["method"] == "lora"
    assert not (out / "history.json").exists()  # the SRLoRA run's history does not linger
    capsys.readouterr()
    assert main([*base, "--method", "lora", "--resume"]) == 0
    assert "finished earlier" in capsys.readouterr().err


# -------------------------------------------------------------- 13, 14, 16. the command line
def _cli(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "srlora.experiments", *argv], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--max-train", "4", "--batch-size", "8"], "4 training example(s), fewer than one batch"),
        (["--max-train", "0"], "--max-train must be >= 1"),
        (["--max-eval", "0"], "--max-eval must be >= 1"),
        (["--max-steps", "-3"], "--max-steps must be >= 1"),
        (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
        (["--lr", "-0.1"], "--lr must be > 0"),
        (["--model", "/nonexistent/model"], "--model /nonexistent/model: no such folder"),
    ],
)
def test_13_14_16_bad_options_stop_at_once_with_one_line(tiny_model, tmp_path, argv, message):
    if "--model" not in argv:
        argv = ["--model", str(tiny_model), *argv]
    root = glue_folder(tmp_path / "GLUE")  # 64 training sentences
    task = ["--task", "sst2", "--data-dir", str(root)]
    done = _cli("train", *task, *argv, "--out", str(tmp_path / "run"), timeout=60)  # never a hang
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("srlora: error: ") and message in lines[-1] and "Traceback" not in done.stderr
    assert not (tmp_path / "run" / "config.json").exists()


def test_14_an_out_that_is_a_file_or_cannot_be_made(tiny_model, fake_cache, tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out, message in ((blocker, "is a file"), (blocker / "under", "cannot create it")):
        assert main(["train", "--model", str(tiny_model), *TINY, "--out", str(out)]) == 2
        assert message in capsys.readouterr().err
    # Permission denied (root writes anywhere, so the refusal is simulated).
    monkeypatch.setattr(Path, "mkdir", lambda *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied")))
    assert main(["train", "--model", str(tiny_model), *TINY, "--out", str(tmp_path / "ro" / "x")]) == 2
    assert "Permission denied" in capsys.readouterr().err


def test_13_a_two_row_tsv_is_refused_not_looped_on(tiny_model, tmp_path):
    root = glue_folder(tmp_path / "GLUE")
    (root / "SST-2" / "train.tsv").write_text("sentence\tlabel\ngood movie\t1\nbad movie\t0\n")
    done = _cli("train", "--task", "sst2", "--data-dir", str(root), "--model", str(tiny_model), *TINY, timeout=60)
    assert done.returncode == 2 and "2 training example(s), fewer than one batch" in done.stderr


# -------------------------------------------------------------- 15. GLUE files
@pytest.mark.parametrize(
    "content,message",
    [
        ("text\tlabel\ngood\t1\n", "train.tsv:1: no column 'sentence'"),
        ("sentence\tlabel\ngood\t1\nbad\tnegative\n", "train.tsv:3: label 'negative' is not one of"),
        ("", "train.tsv: the file is empty"),
        ("sentence\tlabel\ngood\t1\nbad\n", "train.tsv:3: 1 column(s), expected at least 2"),
        ("sentence\tlabel\ngood\t1\nbad\t2\n", "train.tsv:3: label '2' is not one of the task's classes 0..1"),
        ("sentence\tlabel\n", "train.tsv: no examples"),
    ],
)
def test_15_a_bad_glue_tsv_names_file_and_line_before_any_model(tmp_path, content, message):
    root = glue_folder(tmp_path / "GLUE")
    (root / "SST-2" / "train.tsv").write_text(content)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        data.load_task("sst2", root)


def test_15_a_bad_regression_label_and_the_cli_message(tmp_path, capsys):
    root = glue_folder(tmp_path / "GLUE")
    path = root / "STS-B" / "dev.tsv"
    lines = path.read_text().splitlines()
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tn/a"
    path.write_text("\n".join(lines) + "\n")
    assert main(["train", "--task", "stsb", "--data-dir", str(root), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "dev.tsv:3: label 'n/a' is not a number" in err and not (tmp_path / "run").exists()


def test_2_a_fetched_cache_copied_elsewhere_stays_valid(tmp_path, monkeypatch):
    """The hint to copy a cache between machines stays true: new mtimes cost one re-hash."""
    _fake_asset(tmp_path, monkeypatch)
    folder = assets.fetch("fake")
    copy = tmp_path / "other" / "fake"
    copy.parent.mkdir()
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)  # no -p: new mtimes
    for f in copy.iterdir():
        os.utime(f, (1, 1))
    monkeypatch.setenv("SRLORA_CACHE", str(tmp_path / "other"))
    assert assets.fetch("fake") == copy
