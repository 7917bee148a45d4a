"""Faults repeated on purpose: kill -9 in the middle of `index` and `experiment`, then the same command;
two writers on one output; the same seed twice; outputs pointed at a file or a model.

A killed job is a real process sent SIGKILL at a known point (it announces the point and waits there),
so the drill does not depend on timing. Each refusal is checked as a user meets it: exit code 2, one
line naming the cause, no traceback, and whatever was there unchanged byte for byte.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from test_safety import REPO, hold_lock, index_args, refused, train_args, tree_hash

import sbmoe.inference.encoding as encoding
import sbmoe.retrieval.indexing as indexing
from sbmoe.cli.main import main
from sbmoe.config.model import ModelConfig
from sbmoe.core.artifacts import lock_path
from sbmoe.core.io import read_json
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import open_index

# Runs `sbmoe ARGS` with 16-document index chunks; with PAUSE > 0 it stops before the PAUSE+1-th
# chunk or training step, says "paused" and waits to be killed.
PAUSING_SBMOE = """
import sys, time
import sbmoe.inference.encoding as encoding
import sbmoe.inference.encoding as encoding
import sbmoe.retrieval.indexing as indexing
from sbmoe.training.trainer import Trainer

indexing.INDEX_CHUNK_SIZE = 16
what, pause = sys.argv[1], int(sys.argv[2])
seen = []

def pausing(original):
    def call(*args, **kwargs):
        if len(seen) == pause:
            print("paused", flush=True)
            time.sleep(600)
        seen.append(1)
        return original(*args, **kwargs)
    return call

if what == "chunk":
    encoding._run_batches = pausing(encoding._run_batches)
else:
    Trainer.training_step = pausing(Trainer.training_step)
from sbmoe.cli.main import main
sys.exit(main(["-q", *sys.argv[3:]]))
"""


def kill_when_paused(what: str, pause: int, argv: list[str]) -> None:
    """Run ``sbmoe argv`` in a process, SIGKILL it at its ``pause``-th chunk or step, and wait for it."""
    process = subprocess.Popen(
        [sys.executable, "-c", PAUSING_SBMOE, what, str(pause), *argv],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        assert line.strip() == "paused", process.stderr.read() if process.poll() is not None else line
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL


def files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def without_provenance(record: object) -> object:
    """A JSON record less what differs between two identical runs: the command line and the clock."""
    if not isinstance(record, dict):
        return record
    return {k: without_provenance(v) for k, v in record.items() if k not in ("command", "time", "created")}


def leftovers(folder: Path) -> list[str]:
    """Temporaries, chunk folders and locks under ``folder`` (none may outlive a finished job)."""
    return sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.name.endswith((".tmp", ".lock", ".chunks"))
    )


# ------------------------------------------------------------------------------------ kill -9, then again
def test_index_killed_mid_corpus_then_run_again_equals_an_uninterrupted_index(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch
):
    killed, whole = tmp_path / "killed" / "ix", tmp_path / "whole" / "ix"
    kill_when_paused("chunk", 2, index_args(tiny_bert_dir, scifact_slice, killed))
    assert not killed.exists() and len(list(killed.parent.glob(".ix.chunks/*.npy"))) == 2

    monkeypatch.setattr(indexing, "INDEX_CHUNK_SIZE", 16)
    encoded, original = [], encoding._run_batches
    monkeypatch.setattr(encoding, "_run_batches", lambda *a, **k: encoded.append(1) or original(*a, **k))
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, killed)]) == 0
    assert len(encoded) == math.ceil(82 / 16) - 2  # the two chunks finished before the kill were kept
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, whole)]) == 0
    first, second = files(killed), files(whole)
    assert first.keys() == second.keys()
    for name in first:
        if name.endswith(".json"):
            assert without_provenance(json.loads(first[name])) == without_provenance(json.loads(second[name]))
        else:
            assert first[name] == second[name], name  # byte for byte
    assert leftovers(tmp_path) == []


def experiment_grid(tmp_path: Path, tiny_bert_dir: Path, collection: Path) -> Path:
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        yaml.safe_dump(
            {
                "name": "drill",
                "backbones": [str(tiny_bert_dir)],
                "collections": [collection.name],
                "seeds": [1],
                "experts": [2],
                "variants": {"fine-tuned": {"num_experts": 0}, "sb-moe": {}},
                "model": {"max_doc_length": 32},
                "train": {
                    "max_steps": 4,
                    "checkpoint_steps": 2,
                    "checkpoint_selection": "last",
                    "batch_size": 8,
                    "precision": "fp32",
                },
                "evaluate": {"split": "test"},
            }
        ),
        encoding="utf-8",
    )
    return grid


def test_experiment_killed_mid_cell_then_run_again_gives_the_uninterrupted_results(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch
):
    monkeypatch.setenv("SBMOE_DATA_DIR", str(scifact_slice.parent))
    grid = experiment_grid(tmp_path, tiny_bert_dir, scifact_slice)
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    # Killed at step 3 of the first cell: after its step-2 checkpoint, before the next.
    kill_when_paused("step", 2, ["experiment", str(grid), "--output", str(killed)])
    assert not list(killed.glob("cells/*/done.json"))

    assert main(["-q", "experiment", str(grid), "--output", str(killed)]) == 0
    assert main(["-q", "experiment", str(grid), "--output", str(whole)]) == 0
    cells = sorted(p.name for p in (whole / "cells").iterdir())
    assert len(cells) == 2 and sorted(p.name for p in (killed / "cells").iterdir()) == cells
    for cell in cells:
        first, second = files(killed / "cells" / cell), files(whole / "cells" / cell)
        outputs = [n for n in second if not n.startswith("model/training")]
        same_bytes = [n for n in outputs if n.endswith((".trec", ".safetensors")) or "per_query" in n]
        assert same_bytes and all(first[n] == second[n] for n in same_bytes), cell
        assert (
            read_json(killed / "cells" / cell / "done.json")["evaluations"]
            == read_json(whole / "cells" / cell / "done.json")["evaluations"]
        )
    assert leftovers(killed) == []


# ------------------------------------------------------------------------------------ two writers
def test_a_second_writer_of_any_output_is_refused_in_one_line(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv("SBMOE_DATA_DIR", str(scifact_slice.parent))
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, tmp_path / "ix")]) == 0
    grid = experiment_grid(tmp_path, tiny_bert_dir, scifact_slice)
    evaluate = ["evaluate", "--model", str(tiny_bert_dir), "--data", str(scifact_slice), "--output"]
    search = ["search", "--model", str(tiny_bert_dir), "--index", str(tmp_path / "ix"), "--query", "cells"]
    writers = {
        (tmp_path / "ix", ""): index_args(tiny_bert_dir, scifact_slice, tmp_path / "ix"),
        (tmp_path / "eval", ""): [*evaluate, str(tmp_path / "eval")],
        (tmp_path / "run.trec", ""): [*search, "--output", str(tmp_path / "run.trec")],
        # An experiment's workers share its output: each holds its own lock.
        (tmp_path / "exp", "worker-0-of-1"): ["experiment", str(grid), "--output", str(tmp_path / "exp")],
    }
    for (output, role), argv in writers.items():
        before = tree_hash(output) if output.exists() else None
        holder = hold_lock(output, "sleep", role)
        try:
            line = refused(capsys, argv, str(output), "another sbmoe process", f'"pid": {holder.pid}')
        finally:
            holder.kill()
            holder.wait()
        assert "Traceback" not in line
        assert (tree_hash(output) if output.exists() else None) == before, output
    assert not (tmp_path / "exp" / "cells").exists()


# ------------------------------------------------------------------------------------ the same seed twice
def test_the_same_seed_twice_gives_identical_weights_metrics_and_runs(tiny_bert_dir, scifact_slice, tmp_path):
    flags = ["--max-steps", "3", "--seed", "7", "--checkpoint-selection", "last"]
    for name in ("a", "b"):
        assert main(["-q", *train_args(tiny_bert_dir, scifact_slice, tmp_path / name, *flags)]) == 0
        evaluate = ["evaluate", "--model", str(tmp_path / name), "--data", str(scifact_slice)]
        assert main(["-q", *evaluate, "--output", str(tmp_path / f"eval-{name}")]) == 0
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    for name in ("metrics.json", "per_query.json", "run.trec"):
        assert (tmp_path / "eval-a" / name).read_bytes() == (tmp_path / "eval-b" / name).read_bytes(), name


# ------------------------------------------------------------------------------- outputs onto the wrong thing
def test_search_output_onto_an_existing_file_replaces_only_a_run_sbmoe_wrote(
    tiny_bert_dir, scifact_slice, tmp_path, capsys
):
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, tmp_path / "ix")]) == 0
    search = ["search", "--model", str(tiny_bert_dir), "--index", str(tmp_path / "ix"), "--query", "cells"]
    notes = tmp_path / "notes.txt"
    notes.write_text("precious\n", encoding="utf-8")
    refused(
        capsys, [*search, "--output", str(notes)], str(notes), "is not a run sbmoe wrote", "not replacing"
    )
    assert notes.read_text(encoding="utf-8") == "precious\n"
    bm25 = tmp_path / "bm25.trec"
    bm25.write_text("q1 Q0 d1 1 12.5 bm25\n", encoding="utf-8")  # another tool's run is not ours either
    refused(capsys, [*search, "--output", str(bm25)], str(bm25), "line 1")
    assert bm25.read_text(encoding="utf-8") == "q1 Q0 d1 1 12.5 bm25\n"

    run = tmp_path / "run.trec"
    assert main(["-q", *search, "--output", str(run)]) == 0
    first = run.read_bytes()
    assert main(["-q", *search[:-1], "proteins", "--output", str(run)]) == 0  # an earlier run: replaced
    assert run.read_bytes() != first and run.read_bytes().startswith(b"q1 Q0 ")
    assert leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def saved_sbmoe_model(tiny_bert_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults") / "model"
    Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=2), device="cpu").save(folder)
    return folder


@pytest.mark.parametrize("model", ["transformers", "sbmoe"])
def test_train_and_evaluate_onto_a_model_folder_are_refused_and_change_nothing(
    tiny_bert_dir, saved_sbmoe_model, scifact_slice, tmp_path, capsys, model
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_bert_dir if model == "transformers" else saved_sbmoe_model, folder)
    before = tree_hash(folder)
    refused(
        capsys, train_args(tiny_bert_dir, scifact_slice, folder, "--max-steps", "1"), str(folder), "model"
    )
    evaluate = ["evaluate", "--model", str(tiny_bert_dir), "--data", str(scifact_slice)]
    refused(capsys, [*evaluate, "--output", str(folder)], str(folder), "model", "nothing was changed")
    assert tree_hash(folder) == before
    assert not lock_path(folder).exists()


# ------------------------------------------------------------------------------------ a full disk
@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 64 MiB tmpfs of its own, mounted for the test (as root) and unmounted after it."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here to mount a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs (root only): {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """Fill ``disk`` with one file, then give back ``leave`` bytes; returns the file."""
    filler = disk / "filler"
    with filler.open("wb", buffering=0) as handle, contextlib.suppress(OSError):  # ENOSPC: full
        while True:
            handle.write(b"\0" * (1 << 20))
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


def sbmoe_process(argv: list[str]) -> subprocess.CompletedProcess:
    """``sbmoe -q ARGV`` in its own process (stderr as a user sees it, libraries' own handlers too)."""
    environment = {
        **os.environ,
        "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
    }
    command = [sys.executable, "-m", "sbmoe.cli", "-q", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=environment, timeout=600)


@pytest.mark.parametrize(
    ("job", "room"), [("index", 12 * 1024), ("index", 0), ("train", 12 * 1024), ("store", 12 * 1024)]
)
def test_a_full_disk_ends_in_one_line_and_the_same_command_then_finishes_as_if_it_had_not(
    tiny_bert_dir, scifact_slice, tmp_path, small_disk, job, room
):
    """Before, OSError, SafetensorError or MilvusException tracebacks (nothing half-written was
    trusted); with no room even for the lock, another wording. ``room``: bytes left free."""
    name = "corpus.db" if job == "store" else "out"
    store = ["index", "--model", str(tiny_bert_dir), "--data", str(scifact_slice), "--store"]
    commands = {
        "index": lambda place: index_args(tiny_bert_dir, scifact_slice, place / name),
        "train": lambda place: train_args(
            tiny_bert_dir, scifact_slice, place / name, "--max-steps", "2", "--checkpoint-steps", "1"
        ),
        "store": lambda place: [*store, f"milvus:{place / name}"],
    }
    command = commands[job]
    filler = fill(small_disk, leave=room)
    failed = sbmoe_process(command(small_disk))
    flag = "--store" if job == "store" else "--output"
    verb = "train" if job == "train" else "index"
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        f"sbmoe {verb}: error: no space left on {small_disk} writing {small_disk / name}: free space or "
        f"choose another {flag}"
    )
    assert not (small_disk / f".{name}.lock").exists()  # before, an empty lock when there was no room
    filler.unlink()
    for place in (small_disk, tmp_path):  # then the same command, and one that never met a full disk
        assert main(["-q", *command(place)]) == 0
    if job == "store":
        with open_index(f"milvus:{small_disk / name}") as store:
            assert sorted(store.iter_doc_ids()) == sorted(load_collection(scifact_slice).corpus)
    else:
        weights = "index.faiss" if job == "index" else "model.safetensors"
        assert (small_disk / name / weights).read_bytes() == (tmp_path / name / weights).read_bytes()


def test_a_full_cache_disk_is_named_as_the_cache_s_not_the_output_s(
    tiny_bert_dir, scifact_slice, tmp_path, small_disk
):
    """Before, a --cache-dir on a full disk was reported as no space on the output's file system."""
    filler = fill(small_disk, leave=1024)  # less than the embeddings
    cache = small_disk / "cache"
    failed = sbmoe_process(
        [*index_args(tiny_bert_dir, scifact_slice, tmp_path / "out"), "--cache-dir", str(cache)]
    )
    assert failed.returncode == 2 and "Traceback" not in failed.stderr, failed.stderr
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"sbmoe index: error: no space left on {small_disk} writing {cache}/"), last
    assert last.endswith(": free space or choose another --cache-dir"), last
    filler.unlink()
    assert (
        main(["-q", *index_args(tiny_bert_dir, scifact_slice, tmp_path / "out"), "--cache-dir", str(cache)])
        == 0
    )
