"""Outputs are never lost: refusals before any work, locks, overwrite on purpose, stale temporaries, kill -9.

Every refusal is checked the way a user meets it: exit code 2, one line naming the cause, no
traceback, and the directory that was there byte for byte unchanged.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sbmoe.cli.main import main
from sbmoe.core.artifacts import artifact_kind, lock_path, output_lock
from sbmoe.core.io import read_json

REPO = Path(__file__).resolve().parents[1]
TRAIN_FLAGS = ["--batch-size", "8", "--max-doc-length", "48", "--precision", "fp32", "--num-experts", "2"]


def tree_hash(path: Path) -> str:
    """A hash over every file's relative name and bytes under ``path`` (or of ``path`` itself)."""
    digest = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        digest.update(str(file.relative_to(path.parent)).encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()


def refused(capsys, argv: list[str], *expected: str) -> str:
    """Run ``sbmoe argv``: it must exit 2 with one line holding every ``expected`` text."""
    capsys.readouterr()
    assert main(["-q", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith(f"sbmoe {argv[0]}: error:"), err
    for text in expected:
        assert text in lines[-1], (text, lines[-1])
    return lines[-1]


@pytest.fixture
def unrelated(tmp_path) -> Path:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("precious", encoding="utf-8")
    (folder / ".hidden.abcdefgh.tmp").write_text("mine too", encoding="utf-8")
    return folder


def verb_args(verb: str, model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return [verb, "--model", str(model), "--data", str(data), "--output", str(output), *extra]


def index_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return verb_args("index", model, data, output, *extra)


def train_args(model: Path, data: Path, output: Path, *extra: str) -> list[str]:
    return verb_args("train", model, data, output, *TRAIN_FLAGS, *extra)


# ------------------------------------------------------------------------------------ refusals
@pytest.mark.parametrize(
    ("target", "cause"),
    [("model", "holds a model"), ("unrelated", "did not write"), ("file", "is a file")],
)
def test_index_refuses_an_output_that_is_not_an_index(
    tiny_bert_dir, scifact_slice, tmp_path, unrelated, capsys, target, cause
):
    output = {"unrelated": unrelated, "model": tmp_path / "model", "file": tmp_path / "notes.txt"}[target]
    if target == "model":
        shutil.copytree(tiny_bert_dir, output)
    if target == "file":
        output.write_text("precious", encoding="utf-8")
    before = tree_hash(output)
    refused(capsys, index_args(tiny_bert_dir, scifact_slice, output), str(output), cause)
    assert tree_hash(output) == before
    assert not lock_path(output).exists()


def test_train_and_evaluate_refuse_an_unrelated_directory(tiny_bert_dir, scifact_slice, unrelated, capsys):
    before = tree_hash(unrelated)
    refused(capsys, train_args(tiny_bert_dir, scifact_slice, unrelated, "--max-steps", "1"), str(unrelated))
    evaluate = ["evaluate", "--model", str(tiny_bert_dir), "--data", str(scifact_slice)]
    refused(capsys, [*evaluate, "--output", str(unrelated)], str(unrelated), "did not write")
    assert tree_hash(unrelated) == before


@pytest.mark.parametrize("verb", ["index", "evaluate", "train"])
def test_an_output_at_the_root_or_under_a_file_is_refused_in_one_line(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, verb
):
    """Before, the root ended in a ValueError traceback and a path under a file in 'File exists'."""
    extra = [*TRAIN_FLAGS, "--max-steps", "1"] if verb == "train" else []
    refused(
        capsys, verb_args(verb, tiny_bert_dir, scifact_slice, Path("/"), *extra), "root of the file system"
    )
    notes = tmp_path / "notes.txt"
    notes.write_text("precious", encoding="utf-8")
    under = notes / "run" / "deeper"
    refused(capsys, verb_args(verb, tiny_bert_dir, scifact_slice, under, *extra), f"lies under {notes},")
    assert notes.read_text(encoding="utf-8") == "precious"


def test_search_refuses_a_directory_as_its_output(tiny_bert_dir, scifact_slice, tmp_path, unrelated, capsys):
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, tmp_path / "ix")]) == 0
    before = tree_hash(unrelated)
    search = [
        "search",
        "--model",
        str(tiny_bert_dir),
        "--index",
        str(tmp_path / "ix"),
        "--query",
        "cells",
    ]
    refused(capsys, [*search, "--output", str(unrelated)], str(unrelated), "is a directory")
    refused(
        capsys,
        ["search", "--model", str(tiny_bert_dir), "--index", str(tmp_path / "ix"), "--query", " "],
        "empty",
    )
    assert tree_hash(unrelated) == before


def test_an_index_over_an_index_needs_overwrite_when_its_settings_differ(
    tiny_bert_dir, scifact_slice, tmp_path, capsys
):
    output = tmp_path / "ix"
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, output)]) == 0
    assert artifact_kind(output) == "index"
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, output)]) == 0  # same settings: rebuilt
    before = tree_hash(output)
    refused(
        capsys,
        index_args(tiny_bert_dir, scifact_slice, output, "--embedding-dtype", "float16"),
        str(output),
        "index_config.embedding_dtype None -> 'float16'",
        "--overwrite",
    )
    assert tree_hash(output) == before
    assert (
        main(
            [
                "-q",
                *index_args(
                    tiny_bert_dir, scifact_slice, output, "--embedding-dtype", "float16", "--overwrite"
                ),
            ]
        )
        == 0
    )
    assert read_json(output / "meta.json")["dtype"] == "float16"


def add_user_files(folder: Path) -> None:
    """What a user may keep beside an output: a note and a folder of their own."""
    (folder / "NOTES.md").write_text("my notes", encoding="utf-8")
    (folder / "mydata").mkdir()
    (folder / "mydata" / "keep.txt").write_text("keep me", encoding="utf-8")


def assert_user_files(folder: Path) -> None:
    assert (folder / "NOTES.md").read_text(encoding="utf-8") == "my notes"
    assert (folder / "mydata" / "keep.txt").read_text(encoding="utf-8") == "keep me"


# Whether the output was rebuilt with the ``other`` settings of the test below.
REBUILT = {
    "index": lambda out: read_json(out / "meta.json")["dtype"] == "float16",
    "evaluate": lambda out: read_json(out / "config.json")["evaluate_config"]["top_k"] == 50,
    "train": lambda out: read_json(out / "training" / "done.json")["steps"] == 2,
}


@pytest.mark.parametrize(
    ("verb", "inside", "other"),
    [
        ("index", "", ["--embedding-dtype", "float16"]),
        ("index", "shard-00000-of-00002", ["--embedding-dtype", "float16"]),
        ("evaluate", "", ["--top-k", "50"]),
        ("train", "", ["--max-steps", "2"]),
    ],
)
def test_a_rebuild_replaces_only_its_own_files_and_keeps_the_users(
    tiny_bert_dir, scifact_slice, tmp_path, verb, inside, other
):
    """Again with the same settings, then with others and --overwrite: the user's files stay."""
    output = tmp_path / "out"
    argv = verb_args(verb, tiny_bert_dir, scifact_slice, output)
    argv += {"train": [*TRAIN_FLAGS, "--max-steps", "1"], "index": ["--shard", "0/2"] if inside else []}.get(
        verb, []
    )
    assert main(["-q", *argv]) == 0
    add_user_files(output / inside)
    assert main(["-q", *argv]) == 0
    assert_user_files(output / inside)
    assert main(["-q", *argv, *other, "--overwrite"]) == 0
    assert_user_files(output / inside)
    assert REBUILT[verb](output / inside)  # with the other settings


def test_an_experiment_run_again_keeps_the_users_files_and_a_report_refuses_a_folder_with_them(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch, capsys
):
    """experiment resumes beside the user's files; report writes only where its own files are."""
    monkeypatch.setenv("SBMOE_DATA_DIR", str(scifact_slice.parent))
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        json.dumps(
            {
                "backbones": [str(tiny_bert_dir)],
                "collections": [scifact_slice.name],
                "variants": {"fine-tuned": {"num_experts": 0}, "sb-moe": {}},
                "experts": [2],
                "seeds": [1],
                "transfer": False,
                "model": {"max_doc_length": 32},
                "train": {"max_steps": 1, "batch_size": 8, "precision": "fp32"},
            }
        ),
        encoding="utf-8",
    )
    output = tmp_path / "out"
    assert main(["-q", "experiment", str(grid), "--output", str(output)]) == 0
    add_user_files(output)
    assert main(["-q", "experiment", str(grid), "--output", str(output)]) == 0
    assert_user_files(output)
    assert main(["-q", "report", str(output), "--no-plots"]) == 0
    add_user_files(output / "report")
    refused(capsys, ["report", str(output), "--no-plots"], str(output / "report"), "did not write")
    assert_user_files(output / "report")


# ------------------------------------------------------------------------------------ training runs
def test_a_finished_run_asked_for_other_settings_refuses_then_retrains_with_overwrite(
    tiny_bert_dir, scifact_slice, tmp_path, capsys
):
    output = tmp_path / "run"
    assert main(["-q", *train_args(tiny_bert_dir, scifact_slice, output, "--max-steps", "1")]) == 0
    before = tree_hash(output)
    other = train_args(tiny_bert_dir, scifact_slice, output, "--max-steps", "2")
    refused(capsys, other, str(output), "train_config.max_steps 1 -> 2", "--overwrite")
    assert tree_hash(output) == before
    assert main(["-q", *other, "--overwrite"]) == 0
    assert read_json(output / "training" / "done.json")["steps"] == 2
    assert train_steps(output) == [1, 2]  # the old run's log went with it


def test_max_steps_wins_over_epochs(tiny_bert_dir, scifact_slice, tmp_path, capsys):
    output = tmp_path / "run"
    # 48 training queries (43 after dev) in batches of 8: 6 steps per epoch, so 9 steps need 2 epochs.
    argv = train_args(tiny_bert_dir, scifact_slice, output, "--max-steps", "9", "--epochs", "1")
    assert main(["-q", *argv, "--checkpoint-selection", "last"]) == 0
    assert read_json(output / "training" / "done.json")["steps"] == 9


# ------------------------------------------------------------------------------------ locks
HOLD_LOCK = """
import os, sys, time
from sbmoe.core.artifacts import output_lock
with output_lock(sys.argv[1], sys.argv[3]):
    print("locked", flush=True)
    if sys.argv[2] == "die":
        os.kill(os.getpid(), 9)
    time.sleep(60)
"""


def hold_lock(path: Path, how: str, role: str = "") -> subprocess.Popen:
    """A process holding the lock of the output ``path`` (``role``'s, for outputs of several writers)."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(path), how, role], stdout=subprocess.PIPE, text=True, cwd=REPO
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_writer_is_refused_and_a_dead_ones_lock_is_taken_over(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, caplog
):
    output = tmp_path / "run"
    holder = hold_lock(output, "sleep")
    try:
        line = refused(
            capsys,
            train_args(tiny_bert_dir, scifact_slice, output, "--max-steps", "1"),
            "another sbmoe process",
        )
        assert f'"pid": {holder.pid}' in line and str(lock_path(output)) in line
        assert not output.exists()
    finally:
        holder.kill()
        holder.wait()
    dead = hold_lock(tmp_path / "ix", "die")
    dead.wait()
    assert dead.returncode == -signal.SIGKILL and lock_path(tmp_path / "ix").exists()
    with output_lock(tmp_path / "ix"):
        assert json.loads(lock_path(tmp_path / "ix").read_text())["pid"] == os.getpid()
    assert "stale lock" in caplog.text and f'"pid": {dead.pid}' in caplog.text
    assert not lock_path(tmp_path / "ix").exists()


# ------------------------------------------------------------------------------------ temporaries
def test_stale_temporaries_of_an_output_are_removed_on_its_next_run(tiny_bert_dir, scifact_slice, tmp_path):
    output = tmp_path / "ix"
    beside = tmp_path / ".ix.k3j2h1g0.tmp"
    beside.mkdir()
    (beside / "index.faiss").write_bytes(b"half")
    other_output = tmp_path / ".other.k3j2h1g0.tmp"
    other_output.mkdir()
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, output)]) == 0
    assert not beside.exists() and other_output.exists()  # only this output's temporaries go
    inside = output / ".meta.json.a1b2c3d4.tmp"
    inside.write_text("{")
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, output)]) == 0
    assert not inside.exists()


# ------------------------------------------------------------------------------------ kill -9
def run_sbmoe(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sbmoe.cli", "-q", *argv], cwd=REPO, stderr=subprocess.PIPE, text=True
    )


def train_steps(output: Path) -> list[int]:
    log = output / "training" / "log.jsonl"
    if not log.exists():
        return []
    records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return [r["step"] for r in records if r["event"] == "train"]


def test_kill_9_during_training_then_resume_matches_an_uninterrupted_run(
    tiny_bert_dir, scifact_slice, tmp_path, capsys
):
    argv = ["--max-steps", "6", "--checkpoint-steps", "2", "--checkpoint-selection", "last"]
    killed = run_sbmoe(train_args(tiny_bert_dir, scifact_slice, tmp_path / "killed", *argv))
    deadline = time.monotonic() + 60
    while 3 not in train_steps(tmp_path / "killed") and time.monotonic() < deadline:
        assert killed.poll() is None, killed.stderr.read()
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed" / "training" / "done.json").exists()
    capsys.readouterr()
    assert main(["-q", *train_args(tiny_bert_dir, scifact_slice, tmp_path / "killed", *argv)]) == 0
    assert json.loads(capsys.readouterr().out)["resumed_from_step"] in (2, 4)
    assert main(["-q", *train_args(tiny_bert_dir, scifact_slice, tmp_path / "whole", *argv)]) == 0
    assert train_steps(tmp_path / "killed") == [1, 2, 3, 4, 5, 6]  # the log was cut back to the checkpoint
    weight_files = sorted(
        p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").glob("*/**/*.safetensors")
    )
    weight_files += [Path("model.safetensors")]
    for name in weight_files:
        if name.parts[0] == "training":
            continue
        first, second = load_file(str(tmp_path / "whole" / name)), load_file(str(tmp_path / "killed" / name))
        assert first.keys() == second.keys()
        assert all((first[key] == second[key]).all() for key in first), name


# ------------------------------------------------------------------------------------ ranges, integrity
@pytest.mark.parametrize(
    ("flags", "cause"),
    [
        (["--lr-head", "nan"], "lr_head must be a finite number"),
        (["--warmup-ratio", "2"], "warmup_ratio must be in [0, 1], got 2.0"),
        (["--max-steps", "-1"], "max_steps must be >= 1, got -1"),
        (["--epochs", "0"], "epochs must be >= 1, got 0"),
        (["--encode-batch-size", "0"], "encode_batch_size must be >= 1, got 0"),
    ],
)
def test_unusable_training_settings_are_refused_before_anything_is_written(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, flags, cause
):
    refused(capsys, train_args(tiny_bert_dir, scifact_slice, tmp_path / "run", *flags), cause)
    assert not (tmp_path / "run").exists()


def test_a_damaged_index_is_refused_by_its_checksum(tiny_bert_dir, scifact_slice, tmp_path, capsys):
    output = tmp_path / "ix"
    assert main(["-q", *index_args(tiny_bert_dir, scifact_slice, output)]) == 0
    vectors = output / "index.faiss"
    search = ["search", "--model", str(tiny_bert_dir), "--index", str(output), "--query", "cells"]
    original = vectors.read_bytes()
    middle = len(original) // 2
    vectors.write_bytes(original[:middle] + bytes([original[middle] ^ 1]) + original[middle + 1 :])
    refused(capsys, [*search, "--verify"], str(vectors), "SHA-256")
    vectors.write_bytes(bytes(len(original)))  # zeroed, same size
    refused(capsys, search, str(vectors), "sample checksum", "rebuild the index")
