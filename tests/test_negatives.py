"""Hard-negative mining never returns a positive, and ranks what BM25 / the model rank high."""

from __future__ import annotations

import torch

from sbmoe.config.jobs import EncodeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.training.negatives import (
    Mining,
    load_negatives,
    mine_bm25_negatives,
    mine_dense_negatives,
    save_negatives,
)


def assert_no_positives(negatives, qrels, per_query):
    assert negatives
    for query_id, doc_ids in negatives.items():
        positives = {d for d, s in qrels[query_id].items() if s > 0}
        assert not positives & set(doc_ids)
        assert len(doc_ids) == len(set(doc_ids)) <= per_query


def test_bm25_negatives_are_not_positives_and_are_lexically_close(scifact_slice):
    collection = load_collection(scifact_slice)
    qrels = collection.split_qrels("train")
    negatives = mine_bm25_negatives(collection, qrels, Mining(per_query=5, depth=50))
    assert_no_positives(negatives, qrels, 5)
    assert all(len(docs) == 5 for docs in negatives.values())
    # without the filter the top hit is usually a positive: mining had to skip it
    unfiltered = mine_bm25_negatives(collection, {q: {} for q in qrels}, Mining(per_query=1, depth=50))
    hits = sum(unfiltered[q][0] in qrels[q] for q in qrels)
    assert hits > len(qrels) // 2


def test_dense_negatives_are_not_positives(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    qrels = collection.split_qrels("train")
    torch.manual_seed(0)
    retriever = Retriever.from_config(
        ModelConfig(backbone=str(tiny_bert_dir), num_experts=0, max_doc_length=32)
    )
    negatives = mine_dense_negatives(
        retriever,
        collection,
        qrels,
        Mining(per_query=3, depth=20, skip_top=1),
        EncodeConfig(precision="fp32"),
    )
    assert_no_positives(negatives, qrels, 3)
    save_negatives(negatives, tmp_path / "negatives.json")
    assert load_negatives(tmp_path / "negatives.json") == negatives
