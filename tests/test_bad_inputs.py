"""Bad inputs that used to be accepted silently or end in a traceback: damaged models, odd qrels,
empty texts, mistyped grids. Each ends in one line (exit 2) or a counted warning, as a user meets it.
"""

from __future__ import annotations

import json
import shutil
import warnings

import pytest
from test_safety import refused, tree_hash

from sbmoe.config.model import ModelConfig
from sbmoe.core.errors import DataWarning
from sbmoe.data.beir import load_collection, read_queries
from sbmoe.evaluation.metrics import evaluate_run
from sbmoe.model.retriever import Retriever


@pytest.fixture(scope="module")
def saved_model(tiny_bert_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("bad-inputs") / "model"
    Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3), device="cpu").save(
        directory
    )
    return directory


def damaged_copy(saved_model, tmp_path, **config_changes):
    copy = tmp_path / "damaged"
    shutil.copytree(saved_model, copy)
    if config_changes:
        path = copy / "sbmoe.json"
        saved = json.loads(path.read_text(encoding="utf-8"))
        saved["model_config"].update(config_changes)
        path.write_text(json.dumps(saved), encoding="utf-8")
    return copy


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({"num_experts": "six"}, "num_experts must be int, got 'six'"),
        ({"expert_pooling": "bogus"}, "expert_pooling must be one of"),
        ({"pooling": "median"}, "pooling must be one of"),
        ({"num_experts": 5}, "num_experts=5, gating='learned', but the saved weights hold 3 experts"),
    ],
)
def test_a_model_config_that_does_not_fit_is_refused_on_load(
    saved_model, tmp_path, capsys, changes, expected
):
    model = damaged_copy(saved_model, tmp_path, **changes)
    before = tree_hash(model)
    query = ["search", "--model", str(model), "--index", str(tmp_path / "none"), "--query", "cells"]
    refused(capsys, query, "sbmoe.json", expected)
    assert tree_hash(model) == before


def test_truncated_or_empty_weights_end_in_one_line(saved_model, tmp_path, capsys):
    model = damaged_copy(saved_model, tmp_path)
    weights = model / "model.safetensors"
    for damage in (lambda data: data[: len(data) // 2], lambda data: b""):
        weights.write_bytes(damage((saved_model / "model.safetensors").read_bytes()))
        query = ["search", "--model", str(model), "--index", str(tmp_path / "none"), "--query", "cells"]
        refused(capsys, query, "could not load a model from directory", str(model))


def test_negative_qrels_count_as_not_relevant_with_one_warning(scifact_slice, tmp_path):
    original = load_collection(scifact_slice)
    collection = tmp_path / "negative"
    shutil.copytree(scifact_slice, collection)
    query_id, judged = next(iter(original.split_qrels("test").items()))
    unjudged = next(d for d in original.corpus if d not in judged)
    with (collection / "qrels" / "test.tsv").open("a", encoding="utf-8") as handle:
        handle.write(f"{query_id}\t{unjudged}\t-1\n")
    with pytest.warns(DataWarning, match=r"test.tsv: 1 qrels rows have a negative score"):
        loaded = load_collection(collection)
    assert loaded.split_qrels("test")[query_id][unjudged] == 0
    # Ranked above the relevant documents, the -1 document costs nothing, as in BEIR: every score is
    # the one the collection without that row gives.
    run = {q: {unjudged: 2.0, **{d: 1.0 for d in docs}} for q, docs in original.split_qrels("test").items()}
    with_row = evaluate_run(loaded.split_qrels("test"), run).per_query
    assert with_row == evaluate_run(original.split_qrels("test"), run).per_query
    assert with_row["ndcg@10"][query_id] < 1.0  # the run does rank a non-relevant document first


def test_empty_queries_and_documents_are_counted(scifact_slice, tmp_path):
    collection = tmp_path / "empty"
    shutil.copytree(scifact_slice, collection)
    queries = [json.loads(line) for line in (collection / "queries.jsonl").read_text().splitlines()]
    queries[0]["text"] = queries[1]["text"] = "   "
    (collection / "queries.jsonl").write_text("".join(json.dumps(q) + "\n" for q in queries))
    corpus = [json.loads(line) for line in (collection / "corpus.jsonl").read_text().splitlines()]
    corpus[0]["title"], corpus[0]["text"] = "", ""
    (collection / "corpus.jsonl").write_text("".join(json.dumps(d) + "\n" for d in corpus))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_collection(collection)
        read_queries(collection / "queries.jsonl")
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    assert any("corpus.jsonl: 1 documents with an empty title and text" in m for m in messages)
    assert sum("queries.jsonl: 2 queries with an empty text" in m for m in messages) == 2


def test_a_grid_with_mistyped_experts_is_refused_before_any_cell(tmp_path, capsys):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        "name: typo\nbackbones: [all-MiniLM-L6-v2]\ncollections: [scifact]\n"
        "variants: {sb-moe: {}}\nexperts: ['3']\n",
        encoding="utf-8",
    )
    refused(capsys, ["experiment", str(grid), "--list"], str(grid), "`experts` must be whole numbers")


@pytest.mark.parametrize(
    "damaged", ["model.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json"]
)
def test_a_damaged_checkpoint_on_resume_is_named_in_one_line(
    tiny_bert_dir, scifact_slice, tmp_path, capsys, monkeypatch, damaged
):
    from test_safety import train_args

    from sbmoe.cli.main import main
    from sbmoe.train.trainer import Trainer

    output = tmp_path / "run"
    argv = [
        "-q",
        *train_args(tiny_bert_dir, scifact_slice, output, "--max-steps", "4", "--checkpoint-steps", "2"),
    ]
    original = Trainer.training_step

    def killed_at_step_3(self, positions):
        if self.step == 3:
            raise KeyboardInterrupt
        return original(self, positions)

    monkeypatch.setattr(Trainer, "training_step", killed_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        main(argv)
    monkeypatch.setattr(Trainer, "training_step", original)
    target = output / "training" / "checkpoint" / damaged
    target.write_bytes(target.read_bytes()[: len(target.read_bytes()) // 3])
    refused(capsys, argv[1:], str(target))
