"""sbmoe scores a run as BEIR does: BEIR's evaluation procedure, replicated with trec_eval's own code.

BEIR's ``EvaluateRetrieval.evaluate`` (beir/retrieval/evaluation.py) first drops, when
``ignore_identical_ids`` is on, every retrieved document whose id equals the query id, then scores
the run with pytrec_eval (``ndcg_cut.k``, ``map_cut.k``, ``recall.k``, ``P.k``) and averages over
the queries. sbmoe's ``--exclude-self`` is that rule applied at search time.
"""

from __future__ import annotations

import pytest

from sbmoe.config.jobs import SearchConfig
from sbmoe.config.model import ModelConfig
from sbmoe.data.beir import load_collection
from sbmoe.evaluation.metrics import evaluate_run
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.search import search_documents

pytrec_eval = pytest.importorskip("pytrec_eval")

# sbmoe (ranx) metric -> the pytrec_eval measure BEIR reads for it.
MEASURES = {"ndcg@10": "ndcg_cut_10", "ndcg@3": "ndcg_cut_3", "precision@1": "P_1", "recall@10": "recall_10"}


def beir_evaluate(qrels, results, ignore_identical_ids: bool) -> dict[str, dict[str, float]]:
    """BEIR's procedure: pop self-matches if asked, then trec_eval; per metric, query -> score."""
    if ignore_identical_ids:
        results = {qid: {pid: s for pid, s in docs.items() if pid != qid} for qid, docs in results.items()}
    evaluator = pytrec_eval.RelevanceEvaluator(qrels, {"ndcg_cut.3,10", "P.1", "recall.10"})
    scores = evaluator.evaluate(results)
    return {metric: {q: s[measure] for q, s in scores.items()} for metric, measure in MEASURES.items()}


@pytest.fixture(scope="module")
def self_matching(tiny_bert_dir, scifact_slice):
    """Real SciFact queries whose ids are renamed to a document each retrieves, as in ArguAna or
    Quora where a query is itself a document: its best non-relevant hit becomes a self-match."""
    import torch

    torch.manual_seed(0)
    retriever = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    collection = load_collection(scifact_slice, splits=["test"])
    qrels = collection.split_qrels("test")
    documents = {d: doc.full_text for d, doc in collection.corpus.items()}
    queries = {q: collection.queries[q] for q in qrels}
    [run] = search_documents(retriever, queries, documents, SearchConfig(top_k=100)).values()
    renamed: dict[str, str] = {}
    for qid, docs in run.items():
        # Its best-ranked non-relevant document that is not already another query's new id.
        ranked = sorted(docs, key=lambda d: -docs[d])
        taken = set(renamed.values()) | set(qrels)
        renamed[qid] = next(d for d in ranked if qrels[qid].get(d, 0) <= 0 and d not in taken)
    qrels = {renamed[q]: judged for q, judged in qrels.items()}
    queries = {renamed[q]: text for q, text in queries.items()}
    runs = {
        exclude: next(
            iter(search_documents(retriever, queries, documents, SearchConfig(100, exclude)).values())
        )
        for exclude in (False, True)
    }
    return qrels, runs


def test_self_matching_run_is_what_the_test_needs(self_matching):
    qrels, runs = self_matching
    ranks = [sorted(docs, key=lambda d: -docs[d]).index(qid) + 1 for qid, docs in runs[False].items()]
    assert len(ranks) == len(qrels) == 16 and max(ranks) <= 10  # every query retrieves itself, early
    assert len(set(ranks)) > 1  # at several ranks
    assert not any(qid in docs for qid, docs in runs[True].items())
    for docs in runs[False].values():  # no tied scores in the top 11: the order is the same for all
        top = sorted(docs.values(), reverse=True)[:11]
        assert len(set(top)) == len(top)


@pytest.mark.parametrize("exclude_self", [False, True])
def test_sbmoe_scores_equal_beirs(self_matching, exclude_self):
    qrels, runs = self_matching
    beir = beir_evaluate(qrels, runs[False], ignore_identical_ids=exclude_self)
    ours = evaluate_run(qrels, runs[exclude_self], metrics=tuple(MEASURES))
    for metric in MEASURES:
        assert ours.per_query[metric] == pytest.approx(beir[metric], abs=1e-9), metric
        assert ours.metrics[metric] == pytest.approx(sum(beir[metric].values()) / len(qrels), abs=1e-12)


def test_the_rule_matters_on_this_run(self_matching):
    qrels, runs = self_matching
    kept = evaluate_run(qrels, runs[False], metrics=("ndcg@10",)).metrics["ndcg@10"]
    dropped = evaluate_run(qrels, runs[True], metrics=("ndcg@10",)).metrics["ndcg@10"]
    assert dropped > kept  # the self-matches were non-relevant documents ranked above relevant ones
