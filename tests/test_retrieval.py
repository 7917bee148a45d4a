"""The retrieval jobs: one encoding pass serves several inference rules, indexes carry real fingerprints."""

from __future__ import annotations

import pytest
import torch

from sbmoe.config.jobs import EncodeConfig, SearchConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.errors import SbmoeError, UsageError
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import Index, open_index
from sbmoe.retrieval.indexing import build_index
from sbmoe.retrieval.search import search, search_documents

DOCUMENTS = {
    "d1": "vitamin D and bone density in the elderly",
    "d2": "aspirin lowers the risk of heart attacks",
    "d3": "zinc deficiency and the immune system",
    "d4": "iron supplements in pregnancy",
}
QUERIES = {"q1": "does aspirin protect the heart", "q2": "bones of old people"}
FP32 = EncodeConfig(precision="fp32")


@pytest.fixture(scope="module")
def retriever(tiny_bert_dir):
    torch.manual_seed(0)
    return Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3), device="cpu")


def test_each_rule_ranks_as_a_model_saved_with_that_rule(retriever):
    config = SearchConfig(top_k=3)
    rules = SearchConfig(top_k=3, expert_poolings=["top1", "all"])
    runs = search_documents(retriever, QUERIES, DOCUMENTS, rules, FP32)
    assert list(runs) == ["top1", "all"]
    for rule, run in runs.items():
        retriever.head.expert_pooling = rule
        try:
            index = build_index(retriever, DOCUMENTS, encode=FP32)
            expected = search(retriever, index, QUERIES, config, FP32)
        finally:
            retriever.head.expert_pooling = "top1"
        assert list(run) == list(expected)
        for query_id, hits in expected.items():
            assert list(run[query_id]) == list(hits)
            assert list(run[query_id].values()) == pytest.approx(list(hits.values()), abs=1e-6)
    assert retriever.head.expert_pooling == "top1"  # restored
    assert list(search_documents(retriever, QUERIES, DOCUMENTS, config, FP32)) == ["top1"]


def test_a_saved_index_is_opened_by_directory_and_knows_its_model(retriever, tiny_bert_dir, tmp_path):
    index = build_index(retriever, DOCUMENTS, encode=FP32)
    assert index.fingerprint == retriever.fingerprint() and index.location is None
    index.save(tmp_path / "index")
    opened = open_index(tmp_path / "index", retriever.index_fingerprints())
    assert isinstance(opened, Index) and opened.location == str(tmp_path / "index")
    assert search(retriever, opened, QUERIES, encode=FP32) == search(retriever, index, QUERIES, encode=FP32)
    with pytest.raises(UsageError, match="expert_poolings apply to search_documents"):
        search(retriever, opened, QUERIES, SearchConfig(expert_poolings=["all"]))


def test_open_index_names_what_is_not_an_index(tmp_path):
    (tmp_path / "notes.txt").write_text("not an index")
    for location in (tmp_path / "missing", tmp_path / "notes.txt", tmp_path):
        with pytest.raises(SbmoeError, match=str(location)) as caught:
            open_index(location)
        assert len(str(caught.value).splitlines()) == 1
    with pytest.raises(UsageError, match="not-a-store"):
        open_index("milvus:not-a-store")


def test_expert_poolings_need_an_moe_head(tiny_bert_dir):
    plain = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    with pytest.raises(ValueError, match="MoE head"):
        search_documents(plain, QUERIES, DOCUMENTS, SearchConfig(expert_poolings=["all"]))
    assert list(search_documents(plain, QUERIES, DOCUMENTS, encode=FP32)) == ["model"]
