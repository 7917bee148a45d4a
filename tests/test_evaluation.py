"""Tests for sbmoe.evaluation.metrics: hand-computed metrics, ranx conventions, TREC files, metric reports."""

from __future__ import annotations

import json
import math

import pytest

from sbmoe.core.choices import PAPER_METRICS
from sbmoe.evaluation.metrics import (
    EvaluationResult,
    evaluate_run,
    read_trec_run,
    save_metrics,
    write_trec_run,
)

LOG2_3 = math.log2(3)
LOG2_5 = math.log2(5)

# q1: graded judgments; d3 is judged non-relevant. q2: one relevant document. q3: relevant document
# never retrieved (absent from the run). "qx" is in the run only and must be ignored.
QRELS = {
    "q1": {"d1": 2, "d2": 1, "d3": 0, "d4": 1},
    "q2": {"d5": 1},
    "q3": {"d6": 1},
}
RUN = {
    # ranking d3 d2 d9 d1 d7 -> gains 0 1 0 2 0; d4 (relevant) is not retrieved.
    "q1": {"d1": 0.6, "d2": 0.8, "d3": 0.9, "d7": 0.5, "d9": 0.7},
    # ranking d8 d5 -> gains 0 1
    "q2": {"d5": 0.5, "d8": 0.9},
    "qx": {"d1": 1.0},
}

# Hand computation, linear gain (rel_i / log2(i + 1)), 3 relevant documents for q1 (grades 2, 1, 1):
#   q1  DCG@3  = 1/log2(3)                     IDCG@3 = IDCG@10 = 2/1 + 1/log2(3) + 1/log2(4)
#       DCG@10 = 1/log2(3) + 2/log2(5)
#       first relevant at rank 2 -> RR = 1/2; P@1 = 0; recall@100 = 2/3
#       AP = (P@2 + P@4) / 3 = (1/2 + 2/4) / 3 = 1/3
#   q2  DCG@3 = DCG@10 = 1/log2(3), IDCG = 1 -> nDCG = 1/log2(3)
#       RR = 1/2; P@1 = 0; recall = 1; AP = (1/2) / 1 = 1/2
#   q3  nothing retrieved: 0 everywhere, still counted in the mean (3 queries)
IDCG_Q1 = 2 + 1 / LOG2_3 + 1 / 2
EXPECTED_PER_QUERY = {
    "ndcg@3": {"q1": (1 / LOG2_3) / IDCG_Q1, "q2": 1 / LOG2_3, "q3": 0.0},
    "ndcg@10": {"q1": (1 / LOG2_3 + 2 / LOG2_5) / IDCG_Q1, "q2": 1 / LOG2_3, "q3": 0.0},
    "mrr@10": {"q1": 0.5, "q2": 0.5, "q3": 0.0},
    "precision@1": {"q1": 0.0, "q2": 0.0, "q3": 0.0},
    "recall@100": {"q1": 2 / 3, "q2": 1.0, "q3": 0.0},
    "map@100": {"q1": 1 / 3, "q2": 0.5, "q3": 0.0},
}


@pytest.fixture(scope="module")
def result() -> EvaluationResult:
    return evaluate_run(QRELS, RUN)


def test_paper_metrics_are_all_computed(result: EvaluationResult) -> None:
    assert list(result.metrics) == list(PAPER_METRICS)
    assert set(result.per_query) == set(PAPER_METRICS)
    assert result.num_queries == 3


@pytest.mark.parametrize("metric", sorted(EXPECTED_PER_QUERY))
def test_hand_computed_per_query_scores(result: EvaluationResult, metric: str) -> None:
    expected = EXPECTED_PER_QUERY[metric]
    assert result.per_query[metric] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("metric", sorted(EXPECTED_PER_QUERY))
def test_mean_is_over_all_qrels_queries(result: EvaluationResult, metric: str) -> None:
    expected_mean = sum(EXPECTED_PER_QUERY[metric].values()) / 3
    assert result.metrics[metric] == pytest.approx(expected_mean, abs=1e-9)


def test_spot_values(result: EvaluationResult) -> None:
    # The same numbers written out, so a wrong formula above cannot hide a wrong implementation.
    assert result.per_query["ndcg@3"]["q1"] == pytest.approx(0.2015151, abs=1e-6)
    assert result.per_query["ndcg@10"]["q1"] == pytest.approx(0.476626, abs=1e-6)
    assert result.metrics["ndcg@10"] == pytest.approx((0.476626 + 0.630930) / 3, abs=1e-6)
    assert result.metrics["recall@100"] == pytest.approx(5 / 9)


def test_queries_only_in_run_are_ignored(result: EvaluationResult) -> None:
    for scores in result.per_query.values():
        assert "qx" not in scores


def test_missing_and_empty_queries_count_as_zero() -> None:
    qrels = {"a": {"d1": 1}, "b": {"d2": 1}, "c": {"d3": 1}}
    run = {"a": {"d1": 1.0}, "b": {}}  # "b" returned nothing, "c" is absent
    result = evaluate_run(qrels, run, ["ndcg@10", "recall@100"])
    assert result.num_queries == 3
    assert result.per_query["ndcg@10"] == {"a": 1.0, "b": 0.0, "c": 0.0}
    assert result.metrics["ndcg@10"] == pytest.approx(1 / 3)
    assert result.metrics["recall@100"] == pytest.approx(1 / 3)


def test_empty_run_scores_zero() -> None:
    result = evaluate_run({"a": {"d1": 1}}, {}, PAPER_METRICS)
    assert all(value == 0.0 for value in result.metrics.values())


def test_query_with_only_zero_judgments_scores_zero_and_counts() -> None:
    qrels = {"a": {"d1": 1}, "z": {"d2": 0}}
    run = {"a": {"d1": 1.0}, "z": {"d2": 1.0}}
    result = evaluate_run(qrels, run, ["ndcg@10", "precision@1"])
    assert result.num_queries == 2
    assert result.per_query["ndcg@10"]["z"] == 0.0
    assert result.per_query["precision@1"]["z"] == 0.0
    assert result.metrics["ndcg@10"] == pytest.approx(0.5)


def test_ties_are_broken_by_doc_id() -> None:
    # Equal scores: "a" ranks before "b", so the relevant "b" is second.
    result = evaluate_run({"q": {"b": 1}}, {"q": {"b": 0.5, "a": 0.5}}, ["precision@1", "mrr@10"])
    assert result.metrics == {"precision@1": 0.0, "mrr@10": 0.5}


def test_doc_id_lengths_do_not_matter() -> None:
    # ranx's own Qrels/Run objects recompile per doc id length; our path must give the same scores.
    qrels = {"q": {"x" * 40: 1, "y": 2}}
    run = {"q": {"y": 2.0, "x" * 40: 1.0, "z" * 7: 0.5}}
    result = evaluate_run(qrels, run, ["ndcg@10"])
    assert result.metrics["ndcg@10"] == pytest.approx(1.0)


def test_single_metric_string() -> None:
    result = evaluate_run(QRELS, RUN, "mrr@10")
    assert list(result.metrics) == ["mrr@10"]
    assert result.metrics["mrr@10"] == pytest.approx(1 / 3)


def test_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        evaluate_run({}, RUN)
    with pytest.raises(ValueError, match="no metrics"):
        evaluate_run(QRELS, RUN, [])
    with pytest.raises(ValueError, match="not an integer"):
        evaluate_run({"q": {"d": 0.5}}, RUN)
    with pytest.raises(ValueError, match="NaN"):
        evaluate_run({"q": {"d": 1}}, {"q": {"d": float("nan")}})
    with pytest.raises(ValueError, match="not supported"):
        evaluate_run(QRELS, RUN, ["ndgc@10"])


def test_leaves_working_directory_and_numba_threads_alone(tmp_path, monkeypatch) -> None:
    import numba

    monkeypatch.chdir(tmp_path)
    threads = numba.get_num_threads()
    evaluate_run({"q": {"d": 1}}, {"q": {"d": 1.0}})  # fewer than 10 queries: ranx sets 1 thread
    assert numba.get_num_threads() == threads
    assert list(tmp_path.iterdir()) == []


def test_to_dict(result: EvaluationResult) -> None:
    data = result.to_dict()
    assert data["num_queries"] == 3
    assert data["metrics"] == result.metrics
    assert data["per_query"]["mrr@10"]["q2"] == 0.5
    json.dumps(data)


# --- TREC run files -------------------------------------------------------------------------------


def test_trec_round_trip(tmp_path) -> None:
    run = {
        "q1": {"d2": 0.1, "d10": 0.3, "d1": 0.3, "d3": -1.5},
        "q_2": {"doc-a": 1 / 3},
        "empty": {},
    }
    path = write_trec_run(run, tmp_path / "runs" / "run.trec", tag="mymodel")
    lines = path.read_text(encoding="utf-8").splitlines()
    # Descending score, tie (0.3) broken by doc id: "d1" < "d10".
    assert [line.split()[2] for line in lines[:4]] == ["d1", "d10", "d2", "d3"]
    assert [line.split()[3] for line in lines[:4]] == ["1", "2", "3", "4"]
    assert all(line.split()[1] == "Q0" and line.split()[5] == "mymodel" for line in lines)
    back = read_trec_run(path)
    assert back == {qid: docs for qid, docs in run.items() if docs}  # exact floats, empty query gone
    assert evaluate_run({"q1": {"d10": 1}}, back, ["mrr@10"]).metrics["mrr@10"] == 0.5
    assert [p.name for p in path.parent.iterdir()] == ["run.trec"]  # no temp files left


def test_trec_writer_rejects_whitespace(tmp_path) -> None:
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run({"q 1": {"d": 1.0}}, tmp_path / "run.trec")
    with pytest.raises(ValueError, match="whitespace"):
        write_trec_run({"q": {"d": 1.0}}, tmp_path / "run.trec", tag="my model")
    assert not (tmp_path / "run.trec").exists()


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [
        ("q1 Q0 d1 1 0.5", "expected 6 fields"),
        ("q1 Q0 d1 one 0.5 tag", "rank 'one' is not an integer"),
        ("q1 Q0 d1 1 high tag", "score 'high' is not a number"),
        ("q1 Q0 d0 2 0.1 tag", "appears twice"),
    ],
)
def test_malformed_trec_line_names_file_and_line(tmp_path, bad_line: str, message: str) -> None:
    path = tmp_path / "broken.trec"
    path.write_text(f"q1 Q0 d0 1 0.9 tag\n\n{bad_line}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=message) as caught:
        read_trec_run(path)
    assert f"{path}, line 3" in str(caught.value)


# --- metric reports -------------------------------------------------------------------------------


def test_save_metrics(tmp_path, result: EvaluationResult) -> None:
    metrics_path, per_query_path = save_metrics(result, tmp_path / "out", extra={"model": "sbmoe-minilm"})
    assert metrics_path == tmp_path / "out" / "metrics.json"
    assert per_query_path == tmp_path / "out" / "per_query.json"
    summary = json.loads(metrics_path.read_text(encoding="utf-8"))
    assert set(summary) == {*PAPER_METRICS, "num_queries", "model"}
    assert summary["num_queries"] == 3
    assert summary["model"] == "sbmoe-minilm"
    assert summary["mrr@10"] == pytest.approx(1 / 3)
    assert json.loads(per_query_path.read_text(encoding="utf-8")) == result.per_query


def test_save_metrics_refuses_to_overwrite_a_metric_with_extra(tmp_path, result: EvaluationResult) -> None:
    with pytest.raises(ValueError, match="clash"):
        save_metrics(result, tmp_path, extra={"num_queries": 0})
    assert not (tmp_path / "metrics.json").exists()
