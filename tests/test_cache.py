"""The pooled-embedding cache: hits, keys that follow their inputs, damaged entries rebuilt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.inference.cache import EmbeddingCache, texts_digest
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.retriever import Retriever

TEXTS = ["first document about zinc", "second one, on iron deficiency", "third"]
FP32 = EncodeConfig(precision="fp32")


def cached(cache: EmbeddingCache) -> JobOptions:
    """Encode through ``cache``, without progress bars."""
    return JobOptions(show_progress=False, cache=cache)


@pytest.fixture()
def retriever(tiny_bert_dir):
    torch.manual_seed(0)
    return Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=2))


def test_hit_returns_the_same_embeddings_without_encoding(retriever, tmp_path, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    first = encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache))
    assert (cache.hits, cache.misses) == (0, 1)
    np.testing.assert_allclose(first, encode_texts(retriever, TEXTS, "document", FP32), atol=1e-6)

    import sbmoe.inference.encoding

    monkeypatch.setattr(
        sbmoe.inference.encoding, "_run_batches", lambda *a, **k: pytest.fail("encoded again")
    )
    second = encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache))
    assert cache.hits == 1
    np.testing.assert_array_equal(first, second)


def test_a_chunked_encoding_uses_the_whole_lists_entry(retriever, tmp_path, monkeypatch):
    """Head-only training caches a corpus whole; indexing it in chunks afterwards encodes nothing."""
    import sbmoe.inference.encoding

    cache = EmbeddingCache(tmp_path)
    whole = encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache))
    monkeypatch.setattr(
        sbmoe.inference.encoding, "_run_batches", lambda *a, **k: pytest.fail("encoded again")
    )
    chunked = encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache), chunk_size=2)
    np.testing.assert_array_equal(whole, chunked)


def test_every_job_stores_a_corpus_in_the_same_chunks(retriever, tmp_path, monkeypatch):
    """An index built with the cache leaves chunks that head-only training (no chunk size) then reads."""
    import sbmoe.inference.encoding

    monkeypatch.setattr(sbmoe.inference.encoding, "CACHE_CHUNK_SIZE", 2)
    cache = EmbeddingCache(tmp_path)
    indexed = encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache), chunk_size=2)
    monkeypatch.setattr(
        sbmoe.inference.encoding, "_run_batches", lambda *a, **k: pytest.fail("encoded again")
    )
    np.testing.assert_array_equal(
        indexed, encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache))
    )


def test_models_sharing_a_backbone_share_entries(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    with_head = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3))
    without = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0))
    assert with_head.encoder_fingerprint("document") == without.encoder_fingerprint("document")
    cache = EmbeddingCache(tmp_path)
    assert cache.key(with_head, TEXTS, "document", "fp32") == cache.key(without, TEXTS, "document", "fp32")


def test_key_changes_with_texts_weights_kind_precision_and_limit(retriever, tmp_path):
    cache = EmbeddingCache(tmp_path)
    base = cache.key(retriever, TEXTS, "document", "fp32")
    assert cache.key(retriever, [*TEXTS[:2], "third!"], "document", "fp32") != base
    assert cache.key(retriever, list(reversed(TEXTS)), "document", "fp32") != base
    assert cache.key(retriever, TEXTS, "query", "fp32") != base
    assert cache.key(retriever, TEXTS, "document", "bf16") != base
    with torch.no_grad():
        next(retriever.model[0].parameters()).add_(1e-3)
    assert cache.key(retriever, TEXTS, "document", "fp32") != base


def test_texts_digest_respects_boundaries():
    assert texts_digest(["ab", "c"]) != texts_digest(["a", "bc"])


@pytest.mark.parametrize("damage", ["truncate", "wrong_rows"])
def test_damaged_entry_is_rebuilt(retriever, tmp_path, damage):
    cache = EmbeddingCache(tmp_path)
    expected = encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache))
    path = cache.path(cache.key(retriever, TEXTS, "document", "fp32"))
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    else:
        np.save(path, np.zeros((1, expected.shape[1]), dtype=np.float32))
    rebuilt = encode_texts(retriever, TEXTS, "document", FP32, options=cached(cache))
    np.testing.assert_allclose(rebuilt, expected, atol=1e-6)
    assert np.load(path).shape == expected.shape
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_cache_or_not_the_embeddings_are_the_same_under_bf16(retriever, tmp_path):
    # One encode path: the head runs in float32 after the backbone, whether the pooled embeddings
    # come from the backbone or from the cache.
    bf16 = EncodeConfig(precision="bf16")
    plain = encode_texts(retriever, TEXTS, "document", bf16)
    cache = EmbeddingCache(tmp_path)
    stored = encode_texts(retriever, TEXTS, "document", bf16, options=cached(cache))
    reused = encode_texts(retriever, TEXTS, "document", bf16, options=cached(cache))
    assert (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(plain, stored)
    np.testing.assert_array_equal(plain, reused)
