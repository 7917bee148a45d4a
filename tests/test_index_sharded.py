"""Sharded indexes (built shard by shard, searched shard by shard or merged), IVF, memory-mapped loading."""

from __future__ import annotations

import gc
import json

import numpy as np
import pytest
from conftest import assert_same_top_k, search_saved

from sbmoe.cli.main import main
from sbmoe.config.jobs import EncodeConfig, IndexConfig, SearchConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.distributed import shard_bounds
from sbmoe.core.runs import merge_runs
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import open_index
from sbmoe.retrieval.faiss.files import IndexMismatchError, is_sharded_index, shard_directory
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.sharded.index import ShardedIndex

FINGERPRINT = "0123456789abcdef" * 4


def write_shards(docs: np.ndarray, doc_ids: list[str], root, num_shards: int, config=None) -> None:
    for shard in range(num_shards):
        start, stop = shard_bounds(len(doc_ids), shard, num_shards)
        index = DenseIndex(docs[start:stop], doc_ids[start:stop], FINGERPRINT, config)
        index.save_shard(root, shard, num_shards, start, len(doc_ids))


def clustered(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray) -> np.ndarray:
    """Unit vectors around random centres: structure like real embeddings, unlike uniform noise."""
    x = centers[rng.integers(0, len(centers), n)] + 0.5 * rng.standard_normal((n, dim)) / np.sqrt(dim)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_three_shards_search_like_one_index_shard_by_shard_and_merged(tiny_bert_dir, scifact_slice, tmp_path):
    model_dir = tmp_path / "model"
    config = ModelConfig(backbone=str(tiny_bert_dir), num_experts=3, max_doc_length=48)
    Retriever.from_config(config, device="cpu").save(model_dir)
    common = ["--model", str(model_dir), "--data", str(scifact_slice), "--precision", "fp32"]
    assert main(["-q", "index", *common, "--output", str(tmp_path / "single")]) == 0
    sharded = tmp_path / "sharded"
    for shard in (2, 0):
        assert main(["-q", "index", *common, "--output", str(sharded), "--shard", f"{shard}/3"]) == 0
    retriever = Retriever.load(str(model_dir), device="cpu")
    queries = dict(load_collection(scifact_slice).queries)
    with pytest.raises(FileNotFoundError, match=r"lacks 1 of its 3 shards \(1/3\)"):
        search_saved(retriever, sharded, queries)
    assert main(["-q", "index", *common, "--output", str(sharded), "--shard", "1/3"]) == 0
    assert is_sharded_index(sharded) and not is_sharded_index(tmp_path / "single")
    merged = tmp_path / "merged"
    assert main(["-q", "merge-index", "--index", str(sharded), "--output", str(merged)]) == 0

    top10, fp32 = SearchConfig(top_k=10), EncodeConfig(precision="fp32")
    expected = search_saved(retriever, tmp_path / "single", queries, top10, fp32)
    assert_same_top_k(expected, search_saved(retriever, sharded, queries, top10, fp32))
    assert_same_top_k(expected, search_saved(retriever, merged, queries, top10, fp32))
    single_index = DenseIndex.load(tmp_path / "single")
    merged_index = DenseIndex.load(merged)
    assert merged_index.doc_ids == single_index.doc_ids
    np.testing.assert_allclose(merged_index.vectors(), single_index.vectors(), atol=1e-6)
    assert merged_index.metadata["merged_from_shards"] == 3
    assert merged_index.metadata["collection"] == single_index.metadata["collection"]

    with pytest.raises(ValueError, match="sharded index"):
        DenseIndex.load(sharded)
    other = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    with pytest.raises(IndexMismatchError):
        search_saved(other, sharded, queries)
    # The search command reads sharded indexes too.
    assert main(["-q", "search", "--model", str(model_dir), "--index", str(sharded), "--query", "cells"]) == 0


def test_sharded_search_equals_one_flat_index_ties_included(tmp_path):
    # Small integer vectors: many exactly tied scores, so the merge must keep the row order too.
    rng = np.random.default_rng(0)
    docs = rng.integers(-2, 3, size=(301, 8)).astype(np.float32)
    doc_ids = [f"d{i}" for i in range(301)]
    queries = np.vstack([docs[:20], rng.integers(-2, 3, size=(20, 8)).astype(np.float32)])
    query_ids = doc_ids[:20] + [f"q{i}" for i in range(20)]
    write_shards(docs, doc_ids, tmp_path / "sharded", 4)
    sharded = ShardedIndex.load(tmp_path / "sharded", expected_fingerprint=FINGERPRINT)
    single = DenseIndex(docs, doc_ids, FINGERPRINT)
    assert (len(sharded), sharded.num_shards, sharded.dim, sharded.doc_ids) == (301, 4, 8, tuple(doc_ids))
    for k, exclude_self in ((25, False), (5, True), (400, False)):
        expected = single.search(queries, k, query_ids=query_ids, exclude_self=exclude_self)
        assert sharded.search(queries, k, query_ids=query_ids, exclude_self=exclude_self) == expected
    merged = sharded.merge()
    assert merged.index_type == "flat" and merged.doc_ids == tuple(doc_ids)
    assert merged.search(queries, 25) == single.search(queries, 25)


def test_merge_runs_keeps_the_order_of_runs_for_equal_scores():
    first = {"q": {"a": 0.9, "b": 0.5, "c": 0.5}}
    second = {"q": {"d": 0.7, "e": 0.5}, "r": {"f": 0.1}}
    assert merge_runs([first, second], 4) == {"q": {"a": 0.9, "d": 0.7, "b": 0.5, "c": 0.5}, "r": {"f": 0.1}}
    assert list(merge_runs([first, second], 5)["q"]) == ["a", "d", "b", "c", "e"]


def test_inconsistent_shards_are_refused(tmp_path):
    rng = np.random.default_rng(1)
    docs = rng.standard_normal((30, 4)).astype(np.float32)
    ids = [str(i) for i in range(30)]
    write_shards(docs, ids, tmp_path / "a", 3)
    with pytest.raises(IndexMismatchError):
        ShardedIndex.load(tmp_path / "a", expected_fingerprint="another-model-fingerprint")
    DenseIndex(docs[:10], ids[:10], "another-model").save_shard(tmp_path / "a", 0, 3, 0, 30)
    with pytest.raises(ValueError, match="2 different models"):
        ShardedIndex.load(tmp_path / "a")

    write_shards(docs, ids, tmp_path / "b", 3)
    DenseIndex(docs[:15], ids[:15], FINGERPRINT).save_shard(tmp_path / "b", 0, 2, 0, 30)
    with pytest.raises(ValueError, match="mixes shards"):
        ShardedIndex.load(tmp_path / "b")

    write_shards(docs, ids, tmp_path / "c", 2)
    DenseIndex(docs[:14], ids[:14], FINGERPRINT).save_shard(tmp_path / "c", 0, 2, 0, 30)  # a gap
    with pytest.raises(ValueError, match="expected to start at 14"):
        ShardedIndex.load(tmp_path / "c")

    with pytest.raises(FileNotFoundError, match="no index shards"):
        ShardedIndex.load(tmp_path / "nothing")
    DenseIndex(docs, ids, FINGERPRINT).save(tmp_path / "single")
    with pytest.raises(ValueError, match="single"):
        DenseIndex(docs[:10], ids[:10], FINGERPRINT).save_shard(tmp_path / "single", 0, 3, 0, 30)
    assert isinstance(open_index(tmp_path / "single"), DenseIndex)
    write_shards(docs, ids, tmp_path / "d", 3)
    assert isinstance(open_index(tmp_path / "d"), ShardedIndex)


def test_float16_shards_search_and_merge_like_one_float16_index(tmp_path):
    rng = np.random.default_rng(5)
    centers = rng.standard_normal((20, 32))
    docs = clustered(rng, 900, 32, centers)
    queries = clustered(rng, 50, 32, centers)
    ids = [f"d{i}" for i in range(900)]
    write_shards(docs, ids, tmp_path / "half", 3, IndexConfig(embedding_dtype="float16"))
    sharded = ShardedIndex.load(tmp_path / "half")
    assert (sharded.index_type, sharded.dtype) == ("flat", "float16")
    single = DenseIndex(docs, ids, FINGERPRINT, IndexConfig(embedding_dtype="float16"))
    expected = single.search(queries, 10)
    assert_same_top_k(expected, sharded.search(queries, 10))
    merged = sharded.merge()
    assert (merged.dtype, merged.doc_ids) == ("float16", tuple(ids))
    np.testing.assert_array_equal(merged.vectors(), single.vectors())  # float16 -> float32 -> float16
    assert_same_top_k(expected, merged.search(queries, 10))
    assert sharded.merge(IndexConfig(embedding_dtype="float32")).dtype == "float32"
    hnsw = sharded.merge(IndexConfig(index_type="hnsw"))
    assert (hnsw.index_type, hnsw.dtype) == ("hnsw", "float16")

    # Shards of different dtypes (some rebuilt) are searched as they are; merged, float32 by default.
    start, stop = shard_bounds(900, 1, 3)
    DenseIndex(docs[start:stop], ids[start:stop], FINGERPRINT).save_shard(tmp_path / "half", 1, 3, start, 900)
    mixed = ShardedIndex.load(tmp_path / "half")
    assert mixed.dtype == "mixed"
    assert_same_top_k(expected, mixed.search(queries, 10), tolerance=1e-3)
    assert mixed.merge().dtype == "float32"


def test_merge_index_command_sets_the_embedding_dtype(tmp_path):
    rng = np.random.default_rng(6)
    docs = clustered(rng, 300, 16, rng.standard_normal((10, 16)))
    ids = [str(i) for i in range(300)]
    write_shards(docs, ids, tmp_path / "sharded", 2)
    common = ["-q", "merge-index", "--index", str(tmp_path / "sharded"), "--output"]
    assert main([*common, str(tmp_path / "half"), "--embedding-dtype", "float16"]) == 0
    assert main([*common, str(tmp_path / "full")]) == 0  # the shards' dtype
    assert json.loads((tmp_path / "half" / "meta.json").read_text())["dtype"] == "float16"
    assert DenseIndex.load(tmp_path / "full").dtype == "float32"
    half = DenseIndex.load(tmp_path / "half")
    assert half.dtype == "float16"
    np.testing.assert_allclose(half.vectors(), DenseIndex.load(tmp_path / "full").vectors(), atol=1e-3)


def test_ivf_finds_the_exact_neighbours_of_clustered_vectors(tmp_path):
    rng = np.random.default_rng(2)
    centers = rng.standard_normal((40, 32))
    docs = clustered(rng, 4000, 32, centers)
    queries = clustered(rng, 200, 32, centers)
    ids = [f"d{i}" for i in range(4000)]
    exact = DenseIndex(docs, ids, FINGERPRINT).search(queries, 10)
    ivf = DenseIndex(docs, ids, FINGERPRINT, IndexConfig(index_type="ivf"))
    assert (ivf.nlist, ivf.nprobe) == (102, 21)  # the defaults: about 2 sqrt(n) cells, 2 sqrt(nlist) searched

    def recall(run):
        return np.mean([len(set(run[q]) & set(exact[q])) / 10 for q in exact])

    assert recall(ivf.search(queries, 10)) >= 0.9
    ivf.nprobe = 10_000  # clamped to nlist: every cell, exact
    assert ivf.nprobe == 102 and recall(ivf.search(queries, 10)) == 1.0

    ivf.nprobe = 3
    ivf.save(tmp_path / "ivf")
    meta = json.loads((tmp_path / "ivf" / "meta.json").read_text())
    assert (meta["index_type"], meta["nlist"], meta["nprobe"]) == ("ivf", 102, 3)
    loaded = DenseIndex.load(tmp_path / "ivf", expected_fingerprint=FINGERPRINT)
    assert loaded.nprobe == 3 and loaded.search(queries, 10) == ivf.search(queries, 10)
    np.testing.assert_array_equal(loaded.vectors(10, 20), docs[10:20])

    small = DenseIndex(docs, ids, FINGERPRINT, IndexConfig(index_type="ivf", nlist=16, nprobe=16))
    assert recall(small.search(queries, 10)) == 1.0
    with pytest.raises(ValueError, match="more IVF cells"):
        DenseIndex(docs[:10], ids[:10], FINGERPRINT, IndexConfig(index_type="ivf", nlist=11))
    with pytest.raises(ValueError, match="nprobe applies to ivf"):
        DenseIndex(docs, ids, FINGERPRINT, IndexConfig(nprobe=4))
    with pytest.raises(ValueError, match="nlist applies to ivf"):
        DenseIndex(docs, ids, FINGERPRINT, IndexConfig(index_type="hnsw", nlist=4))


def test_shards_merge_into_approximate_indexes(tmp_path):
    rng = np.random.default_rng(3)
    centers = rng.standard_normal((20, 16))
    docs = clustered(rng, 3000, 16, centers)
    queries = clustered(rng, 100, 16, centers)
    ids = [f"d{i}" for i in range(3000)]
    write_shards(docs, ids, tmp_path / "sharded", 3)
    sharded = ShardedIndex.load(tmp_path / "sharded")
    exact = sharded.search(queries, 10)
    for index_type in ("hnsw", "ivf"):
        merged = sharded.merge(IndexConfig(index_type=index_type))
        assert merged.index_type == index_type and merged.doc_ids == tuple(ids)
        run = merged.search(queries, 10)
        assert np.mean([len(set(run[q]) & set(exact[q])) / 10 for q in exact]) >= 0.9
    write_shards(docs, ids, tmp_path / "ivf-shards", 3, IndexConfig(index_type="ivf"))
    ivf_shards = ShardedIndex.load(tmp_path / "ivf-shards")
    assert ivf_shards.index_type == "ivf"
    # IVF shards keep the exact vectors; one big matrix product and three small ones round differently.
    assert_same_top_k(exact, ivf_shards.merge(IndexConfig(index_type="flat")).search(queries, 10))


def test_loaded_indexes_are_memory_mapped_read_only_views(tmp_path):
    rng = np.random.default_rng(4)
    docs = rng.standard_normal((50, 8)).astype(np.float32)
    ids = [str(i) for i in range(50)]
    for index_type in ("flat", "hnsw"):
        DenseIndex(docs, ids, FINGERPRINT, IndexConfig(index_type=index_type)).save(tmp_path / index_type)
        loaded = DenseIndex.load(tmp_path / index_type)
        vectors = loaded.vectors()
        np.testing.assert_array_equal(vectors, docs)
        assert not vectors.flags.writeable
        in_memory = DenseIndex.load(tmp_path / index_type, mmap=False)
        assert in_memory.search(docs[:5], 7) == loaded.search(docs[:5], 7)
    with pytest.raises(ValueError, match="row range"):
        loaded.vectors(10, 5)
    # A view keeps its index, and so the mapped file, alive (it once read unmapped memory).
    views = [DenseIndex.load(tmp_path / index_type).vectors() for index_type in ("flat", "hnsw")]
    gc.collect()
    for view in views:
        np.testing.assert_array_equal(view, docs)
    assert shard_directory(tmp_path, 3, 12).name == "shard-00003-of-00012"
