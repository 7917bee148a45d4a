"""The command line end to end on a real SciFact slice with a tiny model."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from sbmoe.cli.main import main
from sbmoe.core.choices import PAPER_METRICS
from sbmoe.core.io import read_json
from sbmoe.evaluation.metrics import read_trec_run
from sbmoe.model.retriever import Retriever


@pytest.fixture(scope="module")
def trained(tiny_bert_dir, scifact_slice, tmp_path_factory):
    output = tmp_path_factory.mktemp("cli") / "model"
    code = main(
        [
            "-q",
            "train",
            "--model",
            str(tiny_bert_dir),
            "--data",
            str(scifact_slice),
            "--output",
            str(output),
            "--num-experts",
            "3",
            "--max-steps",
            "2",
            "--batch-size",
            "8",
            "--max-doc-length",
            "48",
            "--precision",
            "fp32",
        ]
    )
    assert code == 0
    return output


def test_train_saves_a_loadable_model_with_its_config(trained, capsys):
    assert Retriever.load(str(trained), device="cpu").config.num_experts == 3
    assert read_json(trained / "sbmoe.json")["training"]["steps"] == 2
    run_config = read_json(trained / "training" / "config.json")
    assert run_config["train_config"]["max_steps"] == 2
    assert "--max-steps" in run_config["command"]


def test_evaluate_writes_metrics_per_query_scores_and_run(trained, scifact_slice, tmp_path, capsys):
    code = main(
        [
            "-q",
            "evaluate",
            "--model",
            str(trained),
            "--data",
            str(scifact_slice),
            "--split",
            "test",
            "--output",
            str(tmp_path / "eval"),
            "--precision",
            "fp32",
        ]
    )
    assert code == 0
    metrics = read_json(tmp_path / "eval" / "metrics.json")
    assert set(PAPER_METRICS) <= set(metrics)
    assert metrics["num_queries"] == 16
    per_query = read_json(tmp_path / "eval" / "per_query.json")
    assert len(per_query["ndcg@10"]) == 16
    run = read_trec_run(tmp_path / "eval" / "run.trec")
    n_docs = sum(1 for _ in (scifact_slice / "corpus.jsonl").open())
    assert len(run) == 16 and all(len(docs) == min(100, n_docs) for docs in run.values())
    assert read_json(tmp_path / "eval" / "config.json")["evaluate_config"]["split"] == "test"
    # The train split is read too, to break the scores down by seen and unseen queries.
    assert sum(group["num_queries"] for group in metrics["query_groups"].values()) == 16
    out = capsys.readouterr().out
    assert "nDCG@10" in out and "  unseen queries (n=" in out


def test_evaluate_several_inference_rules_in_one_pass(trained, scifact_slice, tmp_path):
    code = main(
        [
            "-q",
            "evaluate",
            "--model",
            str(trained),
            "--data",
            str(scifact_slice),
            "--output",
            str(tmp_path / "eval"),
            "--expert-pooling",
            "top1",
            "all",
        ]
    )
    assert code == 0
    for rule in ("top1", "all"):
        assert read_json(tmp_path / "eval" / rule / "metrics.json")["expert_pooling"] == rule


def test_index_then_search_and_refuse_another_models_index(
    trained, tiny_bert_dir, scifact_slice, tmp_path, capsys
):
    assert (
        main(
            [
                "-q",
                "index",
                "--model",
                str(trained),
                "--data",
                str(scifact_slice),
                "--output",
                str(tmp_path / "index"),
            ]
        )
        == 0
    )
    meta = read_json(tmp_path / "index" / "meta.json")
    assert meta["count"] == sum(1 for _ in (scifact_slice / "corpus.jsonl").open())
    capsys.readouterr()

    assert (
        main(
            [
                "-q",
                "search",
                "--model",
                str(trained),
                "--index",
                str(tmp_path / "index"),
                "--query",
                "vitamin D and bone health",
                "--top-k",
                "3",
            ]
        )
        == 0
    )
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[1] for line in lines] == ["1", "2", "3"]

    assert (
        main(
            [
                "-q",
                "search",
                "--model",
                str(trained),
                "--index",
                str(tmp_path / "index"),
                "--queries",
                str(scifact_slice / "queries.jsonl"),
                "--output",
                str(tmp_path / "run.trec"),
            ]
        )
        == 0
    )
    assert len(read_trec_run(tmp_path / "run.trec")) == sum(
        1 for _ in (scifact_slice / "queries.jsonl").open()
    )

    capsys.readouterr()
    assert (
        main(
            [
                "-q",
                "search",
                "--model",
                str(tiny_bert_dir),
                "--index",
                str(tmp_path / "index"),
                "--query",
                "anything",
            ]
        )
        == 2
    )
    assert "different model" in capsys.readouterr().err


def test_index_stores_float16_embeddings_on_request(trained, scifact_slice, tmp_path, capsys):
    from sbmoe.retrieval.faiss.index import DenseIndex

    common = ["-q", "index", "--model", str(trained), "--data", str(scifact_slice), "--output"]
    assert main([*common, str(tmp_path / "full")]) == 0
    assert main([*common, str(tmp_path / "half"), "--embedding-dtype", "float16"]) == 0
    assert read_json(tmp_path / "half" / "meta.json")["dtype"] == "float16"
    full, half = DenseIndex.load(tmp_path / "full"), DenseIndex.load(tmp_path / "half")
    assert (full.dtype, half.dtype) == ("float32", "float16")
    assert (tmp_path / "half" / "index.faiss").stat().st_size < 0.6 * (
        tmp_path / "full" / "index.faiss"
    ).stat().st_size
    np.testing.assert_allclose(half.vectors(), full.vectors(), rtol=1e-3, atol=1e-3)

    capsys.readouterr()
    search = ["-q", "search", "--model", str(trained), "--query", "vitamin D", "--top-k", "3", "--index"]
    assert main([*search, str(tmp_path / "half")]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_collection_name_resolves_through_the_data_dir(trained, scifact_slice, tmp_path, monkeypatch):
    monkeypatch.setenv("SBMOE_DATA_DIR", str(scifact_slice.parent))
    assert (
        main(
            [
                "-q",
                "index",
                "--model",
                str(trained),
                "--data",
                scifact_slice.name,
                "--output",
                str(tmp_path / "index"),
            ]
        )
        == 0
    )


def test_bad_corpus_line_is_reported_with_file_and_line(trained, scifact_slice, tmp_path, capsys):
    broken = tmp_path / "broken"
    (broken / "qrels").mkdir(parents=True)
    lines = (scifact_slice / "corpus.jsonl").read_text().splitlines()
    lines[2] = json.dumps({"title": "no id here", "text": "text"})
    (broken / "corpus.jsonl").write_text("\n".join(lines) + "\n")
    (broken / "queries.jsonl").write_text((scifact_slice / "queries.jsonl").read_text())
    code = main(
        ["-q", "index", "--model", str(trained), "--data", str(broken), "--output", str(tmp_path / "i")]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "corpus.jsonl line 3" in error and "_id" in error
    assert not (tmp_path / "i").exists()


def test_unknown_collection_name_lists_where_it_looked(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("SBMOE_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("SBMOE_CACHE_DIR", str(tmp_path / "cache"))
    assert (
        main(["-q", "index", "--model", "x", "--data", "no-such-collection", "--output", str(tmp_path / "i")])
        == 2
    )
    assert "no-such-collection" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["index", "--model", "m", "--data", "d", "--output", "o", "--shard", "-1/2"],
            "--shard -1/2 is invalid",
        ),
        (
            ["index", "--model", "m", "--data", "d", "--output", "o", "--shard", "2/2"],
            "--shard 2/2 is invalid",
        ),
        (["experiment", "grid.yaml", "--worker", "-1/2"], "--worker -1/2 is invalid"),
    ],
)
def test_a_bad_i_of_n_says_what_i_n_means(argv, message, capsys):
    assert main(["-q", *argv]) == 2
    error = capsys.readouterr().err
    assert message in error and "I/N means part I of N, counted from 0" in error
    assert len(error.strip().splitlines()) == 1


def test_experiment_shard_is_now_worker(capsys):
    assert main(["-q", "experiment", "grid.yaml", "--shard", "0/2"]) == 2
    assert "experiment --shard is now --worker 0/2" in capsys.readouterr().err


def test_backend_help_says_what_auto_picks(capsys):
    from sbmoe.core.choices import AUTO_INFERENCE

    with pytest.raises(SystemExit):
        main(["index", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for backend, precision, _ in AUTO_INFERENCE.values():
        assert f"{backend} {precision}" in help_text
    assert "int8 onnx only when asked for" in help_text


def test_the_screen_shows_warnings_as_one_line_and_no_library_chatter(trained, scifact_slice, tmp_path):
    """A command as a user runs it: faiss' loader lines and Python's warning format stay off the screen."""
    command = [sys.executable, "-m", "sbmoe.cli", "index", "--model", str(trained), "--data"]
    command += [str(scifact_slice), "--output", str(tmp_path / "index"), "--precision", "fp32"]
    finished = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    screen = finished.stdout + finished.stderr
    truncated = [line for line in screen.splitlines() if "longer than the model's limit" in line]
    assert len(truncated) == 1 and truncated[0].startswith("warning: scifact-slice corpus: ")
    for chatter in ("UserWarning", "warn_truncated", "Loading faiss", "Could not load library"):
        assert chatter not in screen
