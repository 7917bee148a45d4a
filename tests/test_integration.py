"""Integration with the real pretrained all-MiniLM-L6-v2 on a real SciFact slice."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import write_beir_slice
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig, EvaluateConfig, JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.data.beir import load_collection
from sbmoe.evaluation.evaluate import evaluate_model
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.backbones import resolve_backbone
from sbmoe.model.retriever import Retriever
from sbmoe.study.demo import sentence_transformers_reference
from sbmoe.training.trainer import train

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def collection(data_dir, tmp_path_factory):
    """60 real SciFact test queries with their positives among 100 other real documents."""
    root = write_beir_slice(data_dir / "scifact", tmp_path_factory.mktemp("it") / "scifact-it", 40, 60, 100)
    return load_collection(root)


@pytest.fixture(scope="module")
def minilm():
    """The pretrained model, loaded once: the tests below only encode with it (bf16 runs a copy)."""
    return Retriever.load("all-MiniLM-L6-v2")


def test_zero_shot_matches_sentence_transformers(collection, minilm, tmp_path):
    retriever = minilm
    texts = [doc.full_text for doc in list(collection.corpus.values())[:24]]
    reference = SentenceTransformer(resolve_backbone("all-MiniLM-L6-v2"), device="cpu")
    np.testing.assert_allclose(
        encode_texts(retriever, texts, "document", EncodeConfig(precision="fp32")),
        reference.encode(texts, convert_to_numpy=True),
        atol=2e-5,
    )
    bf16 = EncodeConfig(precision="bf16")
    ours = evaluate_model(
        retriever,
        collection,
        tmp_path / "zs",
        EvaluateConfig(),
        bf16,
        options=JobOptions(show_progress=False),
    )[0]
    st_result, _ = sentence_transformers_reference("all-MiniLM-L6-v2", collection, "test", 256, batch_size=32)
    assert ours.result.metrics["ndcg@10"] > 0.5  # a real retriever, not noise
    assert abs(ours.result.metrics["ndcg@10"] - st_result.metrics["ndcg@10"]) < 0.01


def test_bf16_embeddings_of_the_pretrained_model_agree_with_fp32(collection, minilm):
    retriever = minilm
    texts = [doc.full_text for doc in list(collection.corpus.values())[:32]]
    fp32 = encode_texts(retriever, texts, "document", EncodeConfig(precision="fp32"))
    bf16 = encode_texts(retriever, texts, "document", EncodeConfig(precision="bf16"))
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99


def test_onnx_int8_embeddings_of_the_pretrained_model_agree_with_fp32(collection, minilm):
    retriever = minilm
    texts = [doc.full_text for doc in list(collection.corpus.values())[:32]]
    fp32 = encode_texts(retriever, texts, "document", EncodeConfig(backend="torch", precision="fp32"))
    onnx_fp32 = encode_texts(retriever, texts, "document", EncodeConfig(backend="onnx", precision="fp32"))
    int8 = encode_texts(retriever, texts, "document", EncodeConfig(backend="onnx", precision="int8"))
    np.testing.assert_allclose(onnx_fp32, fp32, atol=1e-4)
    cosine = (fp32 * int8).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.mean() > 0.99 and cosine.min() > 0.98


def test_sb_moe_fine_tuning_runs_end_to_end(collection, tmp_path):
    model_config, train_config = build_configs(
        "default",
        {"backbone": "all-MiniLM-L6-v2", "num_experts": 3, "max_doc_length": 96},
        {"max_steps": 3, "batch_size": 8, "dev_max_docs": 60, "precision": "bf16"},
    )
    result = train(
        model_config, train_config, collection, tmp_path / "model", JobOptions(show_progress=False)
    )
    assert result.steps == 3 and result.best_dev_ndcg10 > 0.3
    trained = Retriever.load(str(tmp_path / "model"))
    assert trained.head is not None and trained.config == dataclasses.replace(
        trained.config, num_experts=3, similarity="cosine"
    )
    outputs = evaluate_model(
        trained,
        collection,
        tmp_path / "eval",
        EvaluateConfig(expert_poolings=["top1", "all"]),
        options=JobOptions(show_progress=False),
    )
    assert {o.name for o in outputs} == {"top1", "all"}
    assert all(o.result.metrics["ndcg@10"] > 0.5 for o in outputs)
    reloaded = SentenceTransformer(str(tmp_path / "model"), trust_remote_code=True, device="cpu")
    texts = [collection.queries[q] for q in list(collection.queries)[:4]]
    np.testing.assert_allclose(
        reloaded.encode(texts, convert_to_numpy=True),
        encode_texts(trained, texts, "query", EncodeConfig(precision="fp32")),
        atol=2e-5,
    )
