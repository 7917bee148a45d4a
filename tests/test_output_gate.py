"""One gate per job, in the library: a Python caller is refused exactly where the command line is.

Every job that writes opens its output through :func:`sbmoe.core.artifacts.writing_output` (kind,
lock, ``overwrite``); the CLI checks nothing of its own, so the same call through either gives the
same one-line refusal and leaves what was there untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

from sbmoe.cli.main import main
from sbmoe.config.jobs import IndexConfig, JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.core.artifacts import INDEX, artifact_kind, output_lock
from sbmoe.core.errors import UsageError
from sbmoe.core.io import read_json
from sbmoe.model.hub import write_model_card
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.indexing import merge_index
from sbmoe.study.experiments import run_experiment
from sbmoe.study.grid import check_grid
from sbmoe.study.report import write_report

FINGERPRINT = "0123456789abcdef" * 4


def write_shards(root, fingerprint: str = FINGERPRINT, num_shards: int = 2) -> None:
    rng = np.random.default_rng(0)
    docs = rng.standard_normal((6, 8)).astype(np.float32)
    for shard in range(num_shards):
        start, stop = shard * 3, shard * 3 + 3
        index = DenseIndex(docs[start:stop], [f"d{i}" for i in range(start, stop)], fingerprint)
        index.save_shard(root, shard, num_shards, start, 6)


def cli_error(argv: list[str], capsys) -> str:
    assert main(["-q", *argv]) == 2
    return capsys.readouterr().err.strip().split(": error: ", 1)[1]


def test_merge_checks_its_output_and_honours_overwrite(tmp_path, capsys):
    write_shards(tmp_path / "a")
    write_shards(tmp_path / "b", fingerprint="f" * 64)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError) as refused:
        merge_index(tmp_path / "a", foreign)
    # The command line says the same thing, because it is the same check.
    assert cli_error(
        ["merge-index", "--index", str(tmp_path / "a"), "--output", str(foreign)], capsys
    ) == str(refused.value)
    assert "is a non-empty directory that sbmoe did not write" in str(refused.value)
    assert (foreign / "mine.txt").read_text() == "keep me"

    merged = tmp_path / "merged"
    merge_index(tmp_path / "a", merged, options=JobOptions(command=["test"]))
    merge_index(tmp_path / "a", merged)  # the same shards again: the same index, replaced
    with pytest.raises(UsageError, match=r"made with other settings \(fingerprint .*pass --overwrite"):
        merge_index(tmp_path / "b", merged)
    assert read_json(merged / "meta.json")["fingerprint"] == FINGERPRINT  # untouched
    merge_index(tmp_path / "b", merged, options=JobOptions(overwrite=True))
    assert read_json(merged / "meta.json")["fingerprint"] == "f" * 64
    assert artifact_kind(merged) == INDEX


def test_a_second_writer_is_refused_through_the_api(tmp_path):
    write_shards(tmp_path / "a")
    with output_lock(tmp_path / "merged"), pytest.raises(UsageError, match="being written by another"):
        merge_index(tmp_path / "a", tmp_path / "merged", IndexConfig())
    assert not (tmp_path / "merged").exists()


def test_report_experiment_and_model_card_refuse_what_they_did_not_write(tiny_bert_dir, tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    with pytest.raises(UsageError, match="did not write; sbmoe writes a report only where"):
        write_report(None, foreign)  # refused before the report is even looked at
    grid = check_grid({"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}}, "grid")
    with pytest.raises(UsageError, match="sbmoe writes an experiment only where"):
        run_experiment(grid, foreign, JobOptions(show_progress=False))
    assert sorted(p.name for p in foreign.iterdir()) == ["mine.txt"]

    model = tmp_path / "model"
    Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=2), device="cpu").save(model)
    with output_lock(model), pytest.raises(UsageError, match="being written by another"):
        write_model_card(model)
    assert write_model_card(model) == model / "README.md"


def test_search_output_onto_a_directory_is_refused_before_the_model_loads(tmp_path, capsys):
    target = tmp_path / "runs"
    target.mkdir()
    error = cli_error(
        [
            "search",
            "--model",
            str(tmp_path / "no-model"),
            "--index",
            "i",
            "--query",
            "q",
            "--output",
            str(target),
        ],
        capsys,
    )
    assert error == f"--output {target} is a directory; this job writes a file there: name a file"


def test_a_published_report_folder_is_a_report_and_an_experiment_is_not(tmp_path):
    from sbmoe.core.artifacts import EXPERIMENT, REPORT

    published = tmp_path / "what-helps"
    (published / "vs-zero-shot").mkdir(parents=True)
    for name in ("tables.md", "tables.tex", "results.json", "experiment.json", "expert_usage.png"):
        (published / name).write_text("x")
    (published / "vs-zero-shot" / "tables.md").write_text("x")
    assert artifact_kind(published) == REPORT  # `sbmoe report --output` may write there again
    experiment = tmp_path / "runs"
    (experiment / "cells").mkdir(parents=True)
    (experiment / "experiment.json").write_text("{}")
    assert artifact_kind(experiment) == EXPERIMENT
    (published / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds an sbmoe experiment; sbmoe writes a report only where"):
        write_report(None, published)  # not a report any more: refused, nothing changed
    assert (published / "notes.txt").read_text() == "mine"
