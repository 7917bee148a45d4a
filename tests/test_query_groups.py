"""Seen, partly-seen and unseen queries: by hand, on real SciFact, and in every evaluation's metrics."""

from __future__ import annotations

import pytest

from sbmoe.config.jobs import EvaluateConfig, JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.core.io import read_json
from sbmoe.data.beir import load_collection
from sbmoe.evaluation.evaluate import evaluate_model
from sbmoe.evaluation.metrics import evaluate_run, read_query_groups, save_metrics
from sbmoe.evaluation.query_groups import (
    group_queries,
    group_scores,
    split_query_groups,
    splits_to_load,
    training_positives,
)
from sbmoe.model.retriever import Retriever

TRAIN = {"t1": {"d1": 1, "d2": 0}, "t2": {"d3": 2}}  # d2 is judged, but not relevant
TEST = {
    "all-seen": {"d1": 1, "d3": 1},
    "some-seen": {"d1": 1, "d4": 2},
    "judged-not-positive": {"d2": 1, "d4": 1},  # d2 was only judged non-relevant in training
    "seen-doc-not-relevant": {"d1": 0, "d5": 1},  # d1 is not relevant to this query
    "nothing-relevant": {"d1": 0},
}


def test_groups_by_hand():
    assert training_positives(TRAIN) == {"d1", "d3"}
    groups = group_queries(TEST, training_positives(TRAIN))
    assert groups == {
        "seen": ["all-seen"],
        "partly-seen": ["some-seen"],
        "unseen": ["judged-not-positive", "seen-doc-not-relevant"],
    }  # a query without a relevant document is in no group


def test_groups_need_a_train_split_other_than_the_evaluated_one(tmp_path):
    assert split_query_groups({"test": TEST}, "test") is None
    assert split_query_groups({"train": TRAIN, "test": TEST}, "train") is None
    assert split_query_groups({"train": TRAIN, "test": TEST}, "test")["seen"] == ["all-seen"]
    (tmp_path / "qrels").mkdir()
    assert splits_to_load(tmp_path, "test") == ["test"]
    (tmp_path / "qrels" / "train.tsv").write_text("query-id\tcorpus-id\tscore\n", encoding="utf-8")
    assert splits_to_load(tmp_path, "test") == ["test", "train"]
    assert splits_to_load(tmp_path, "train") == ["train"]


def test_real_scifact_counts(data_dir):
    collection = load_collection(data_dir / "scifact", splits=["train", "test"])
    test = collection.split_qrels("test")
    groups = split_query_groups(collection.qrels, "test")
    assert {name: len(ids) for name, ids in groups.items()} == {"seen": 193, "partly-seen": 3, "unseen": 104}
    positives = training_positives(collection.split_qrels("train"))
    pairs = [(q, d) for q, docs in test.items() for d in docs]
    assert (sum(d in positives for _, d in pairs), len(pairs)) == (216, 339)  # the pairs of issue 14


def test_group_scores_and_saved_metrics(tmp_path):
    qrels = {q: judged for q, judged in TEST.items()}
    run = {"all-seen": {"d1": 2.0, "d3": 1.0}, "some-seen": {"d9": 1.0, "d1": 0.5}}
    result = evaluate_run(qrels, run, metrics=("ndcg@10", "precision@1"))
    groups = group_queries(TEST, training_positives(TRAIN))
    summary = group_scores(result.per_query, groups)
    assert summary["seen"] == {"num_queries": 1, "ndcg@10": 1.0, "precision@1": 1.0}
    assert summary["partly-seen"]["precision@1"] == 0.0 and summary["unseen"]["ndcg@10"] == 0.0
    assert group_scores(result.per_query, {"seen": []}) == {"seen": {"num_queries": 0}}

    save_metrics(result, tmp_path, extra={"split": "test"}, query_groups=groups)
    metrics = read_json(tmp_path / "metrics.json")
    assert metrics["query_groups"] == summary and metrics["num_queries"] == 5
    assert read_query_groups(tmp_path) == groups
    # Saved again without groups (e.g. another split): no stale groups are left behind.
    save_metrics(result, tmp_path)
    assert "query_groups" not in read_json(tmp_path / "metrics.json")
    assert read_query_groups(tmp_path) is None
    with pytest.raises(ValueError, match="clash"):
        save_metrics(result, tmp_path, extra={"query_groups": 1})


def test_every_evaluation_on_a_collection_with_a_train_split_reports_groups(
    tiny_bert_dir, scifact_slice, tmp_path
):
    retriever = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    collection = load_collection(scifact_slice)
    config = EvaluateConfig(metrics=["ndcg@10"])
    [output] = evaluate_model(
        retriever, collection, tmp_path / "test", config, options=JobOptions(show_progress=False)
    )
    expected = group_queries(
        collection.split_qrels("test"), training_positives(collection.split_qrels("train"))
    )
    assert read_query_groups(tmp_path / "test") == expected
    saved = read_json(tmp_path / "test" / "metrics.json")["query_groups"]
    assert saved == output.query_groups
    assert sum(g["num_queries"] for g in saved.values()) == 16
    per_query = output.result.per_query["ndcg@10"]
    for name, ids in expected.items():
        if ids:
            assert saved[name]["ndcg@10"] == pytest.approx(sum(per_query[q] for q in ids) / len(ids))

    # The train split itself, and a collection loaded without its train split: no groups.
    train = EvaluateConfig(metrics=["ndcg@10"], split="train")
    [output] = evaluate_model(
        retriever, collection, tmp_path / "train", train, options=JobOptions(show_progress=False)
    )
    assert output.query_groups is None and read_query_groups(tmp_path / "train") is None
    test_only = load_collection(scifact_slice, splits=["test"])
    evaluate_model(retriever, test_only, tmp_path / "alone", config, options=JobOptions(show_progress=False))
    assert "query_groups" not in read_json(tmp_path / "alone" / "metrics.json")
