"""Tests for sbmoe.retrieval.faiss.index: exact and HNSW search, exclude_self, save/load, fingerprints,
float16 storage, validation."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from sbmoe.config.jobs import IndexConfig
from sbmoe.retrieval.faiss.files import IndexMismatchError
from sbmoe.retrieval.faiss.index import DenseIndex

FINGERPRINT = "a1b2c3d4e5f6a7b8c9d0" * 2


def _brute_force(queries: np.ndarray, docs: np.ndarray, k: int) -> list[list[int]]:
    """Top-k rows per query by descending score, ties by ascending row: the documented order."""
    scores = queries.astype(np.float64) @ docs.astype(np.float64).T
    return [sorted(range(len(docs)), key=lambda j, s=row: (-s[j], j))[:k] for row in scores]


def _normalized(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture
def corpus() -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(0)
    return _normalized(rng, 300, 24), [f"doc{i}" for i in range(300)]


def test_flat_search_equals_brute_force_with_ties() -> None:
    # Small integer vectors: every inner product is exact in float32 and ties are frequent, so the
    # comparison checks the tie rule too, not just near-equality.
    rng = np.random.default_rng(1)
    docs = rng.integers(-2, 3, size=(400, 8)).astype(np.float32)
    queries = rng.integers(-2, 3, size=(37, 8)).astype(np.float32)
    doc_ids = [f"d{i}" for i in range(400)]
    index = DenseIndex(docs, doc_ids, FINGERPRINT)
    run = index.search(queries, k=25, batch_size=8)
    expected = _brute_force(queries, docs, 25)
    assert list(run) == [str(i) for i in range(37)]
    for qi, qid in enumerate(run):
        assert list(run[qid]) == [doc_ids[j] for j in expected[qi]]
        assert list(run[qid].values()) == [float(queries[qi] @ docs[j]) for j in expected[qi]]


def test_flat_search_on_float_vectors(corpus) -> None:
    docs, doc_ids = corpus
    queries = _normalized(np.random.default_rng(2), 50, 24)
    run = DenseIndex(docs, doc_ids, FINGERPRINT).search(queries, k=10)
    reference = queries @ docs.T
    for qi, docs_scores in enumerate(run.values()):
        rows = [int(doc_id[3:]) for doc_id in docs_scores]
        assert rows == list(np.argsort(-reference[qi], kind="stable")[:10])
        assert list(docs_scores.values()) == pytest.approx(reference[qi, rows].tolist(), abs=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("batch_size", [1024, 1])
def test_exact_search_across_corpus_blocks(monkeypatch, tmp_path, dtype: str, batch_size: int) -> None:
    # Force many corpus blocks so the block-merging path is exercised, ties included. Small integers
    # are exact in float16 too, so both dtypes must give the brute-force ranking exactly, in batches
    # and one query at a time (other code paths), in memory and memory-mapped (misaligned vectors).
    import sbmoe.retrieval.faiss.exact_search

    monkeypatch.setattr(sbmoe.retrieval.faiss.exact_search, "_SCORE_BLOCK", 64)
    rng = np.random.default_rng(3)
    docs = rng.integers(-1, 2, size=(203, 6)).astype(np.float32)
    queries = rng.integers(-1, 2, size=(9, 6)).astype(np.float32)
    index = DenseIndex(docs, [str(i) for i in range(203)], FINGERPRINT, IndexConfig(embedding_dtype=dtype))
    for searched in (index, DenseIndex.load(index.save(tmp_path / "index"))):
        run = searched.search(queries, k=17, batch_size=batch_size)
        assert [[int(d) for d in hits] for hits in run.values()] == _brute_force(queries, docs, 17)


def test_batch_size_does_not_change_results(corpus) -> None:
    docs, doc_ids = corpus
    index = DenseIndex(docs, doc_ids, FINGERPRINT)
    queries = docs[:40] + 0.01
    small, large = index.search(queries, 7, batch_size=3), index.search(queries, 7, batch_size=1024)
    assert list(small) == list(large)
    for qid in large:
        # BLAS may round the last bit differently for differently shaped batches.
        assert list(small[qid]) == list(large[qid])
        assert list(small[qid].values()) == pytest.approx(list(large[qid].values()), rel=1e-6)


def test_exclude_self(corpus) -> None:
    docs, doc_ids = corpus
    index = DenseIndex(docs, doc_ids, FINGERPRINT)
    queries, qids = docs[:20], doc_ids[:20]
    with_self = index.search(queries, k=5, query_ids=qids)
    assert all(next(iter(with_self[qid])) == qid for qid in qids)  # each document finds itself first

    run = index.search(queries, k=5, query_ids=qids, exclude_self=True)
    expected = _brute_force(queries, docs, 6)
    for qi, qid in enumerate(qids):
        assert qid not in run[qid]
        assert len(run[qid]) == 5
        assert list(run[qid]) == [doc_ids[j] for j in expected[qi] if doc_ids[j] != qid][:5]


def test_exclude_self_when_query_is_not_in_corpus(corpus) -> None:
    docs, doc_ids = corpus
    run = DenseIndex(docs, doc_ids, FINGERPRINT).search(
        docs[:3], k=4, query_ids=["x", "y", "z"], exclude_self=True
    )
    assert [len(hits) for hits in run.values()] == [4, 4, 4]
    assert next(iter(run["x"])) == "doc0"


def test_k_is_clamped_to_corpus_size() -> None:
    docs = _normalized(np.random.default_rng(4), 6, 4)
    ids = list("abcdef")
    index = DenseIndex(docs, ids, FINGERPRINT)
    assert all(len(hits) == 6 for hits in index.search(docs, k=100).values())
    run = index.search(docs, k=100, query_ids=ids, exclude_self=True)
    assert all(len(hits) == 5 and qid not in hits for qid, hits in run.items())


def test_hnsw_finds_most_exact_neighbours(corpus) -> None:
    docs, doc_ids = corpus
    queries = _normalized(np.random.default_rng(5), 30, 24)
    exact = DenseIndex(docs, doc_ids, FINGERPRINT).search(queries, k=10)
    approx = DenseIndex(docs, doc_ids, FINGERPRINT, IndexConfig(index_type="hnsw")).search(queries, k=10)
    overlap = np.mean([len(set(exact[q]) & set(approx[q])) / 10 for q in exact])
    assert overlap >= 0.9
    assert all(len(hits) == 10 for hits in approx.values())


def test_padding_rows_from_faiss_are_dropped(corpus, monkeypatch) -> None:
    # HNSW returns row -1 (score -inf or -3.4e38) when its graph walk finds fewer than k documents.
    docs, doc_ids = corpus
    index = DenseIndex(docs, doc_ids, FINGERPRINT, IndexConfig(index_type="hnsw"))
    padded = (np.array([[0.9, 0.5, -np.inf], [0.8, 0.7, 0.6]]), np.array([[4, 7, -1], [1, 2, 3]]))
    monkeypatch.setattr(index, "_search_batch", lambda queries, k: padded)
    run = index.search(docs[:2], k=3, query_ids=["q", "doc2"], exclude_self=True)
    assert run == {"q": {"doc4": 0.9, "doc7": 0.5}, "doc2": {"doc1": 0.8, "doc3": 0.6}}


def test_float64_and_int_inputs_are_converted(corpus) -> None:
    docs, doc_ids = corpus
    index = DenseIndex(docs.astype(np.float64), doc_ids, FINGERPRINT)
    assert index.search(docs[:5].astype(np.float64), 3) == DenseIndex(docs, doc_ids, FINGERPRINT).search(
        docs[:5], 3
    )


@pytest.mark.parametrize("index_type", ["flat", "hnsw"])
def test_save_load_round_trip(tmp_path, corpus, index_type: str) -> None:
    docs, doc_ids = corpus
    index = DenseIndex(
        docs, doc_ids, FINGERPRINT, IndexConfig(index_type=index_type), metadata={"dataset": "toy"}
    )
    queries = _normalized(np.random.default_rng(6), 25, 24)
    before = index.search(queries, k=10)

    index.save(tmp_path / "idx")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == [
        "doc_ids.json",
        "index.faiss",
        "meta.json",
    ]
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text(encoding="utf-8"))
    assert meta["fingerprint"] == FINGERPRINT
    assert (meta["index_type"], meta["dim"], meta["count"]) == (index_type, 24, 300)
    assert meta["metadata"] == {"dataset": "toy"}
    assert {"created", "sbmoe_version"} <= set(meta)

    loaded = DenseIndex.load(tmp_path / "idx", expected_fingerprint=FINGERPRINT)
    assert loaded.doc_ids == tuple(doc_ids)
    assert (loaded.fingerprint, loaded.index_type, loaded.metadata) == (
        FINGERPRINT,
        index_type,
        {"dataset": "toy"},
    )
    assert loaded.search(queries, k=10) == before


def test_fingerprint_mismatch(tmp_path, corpus) -> None:
    docs, doc_ids = corpus
    DenseIndex(docs, doc_ids, FINGERPRINT).save(tmp_path / "idx")
    other = "ffffeeeeddddccccbbbbaaaa"
    with pytest.raises(IndexMismatchError) as caught:
        DenseIndex.load(tmp_path / "idx", expected_fingerprint=other)
    message = str(caught.value)
    assert isinstance(caught.value, ValueError)
    assert "different model" in message
    assert FINGERPRINT[:12] in message and other[:12] in message
    assert FINGERPRINT[:13] not in message  # shortened
    assert "sbmoe index" in message
    assert DenseIndex.load(tmp_path / "idx").fingerprint == FINGERPRINT  # no check without expectation


def test_fingerprints_sharing_a_prefix_are_shown_in_full(tmp_path, corpus) -> None:
    docs, doc_ids = corpus
    DenseIndex(docs, doc_ids, "model-v1-0000000001").save(tmp_path / "idx")
    with pytest.raises(IndexMismatchError, match="model-v1-0000000002"):
        DenseIndex.load(tmp_path / "idx", expected_fingerprint="model-v1-0000000002")


def test_interrupted_save_keeps_previous_index(tmp_path, corpus, monkeypatch) -> None:
    docs, doc_ids = corpus
    old = DenseIndex(docs, doc_ids, FINGERPRINT)
    old.save(tmp_path / "idx")
    queries = docs[:10]
    expected = old.search(queries, k=5)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(faiss, "write_index", crash)
    new = DenseIndex(docs[:50] * -1, doc_ids[:50], "another-model")
    with pytest.raises(OSError, match="disk full"):
        new.save(tmp_path / "idx")

    assert [p.name for p in tmp_path.iterdir()] == ["idx"]  # no temporary directory left behind
    survivor = DenseIndex.load(tmp_path / "idx", expected_fingerprint=FINGERPRINT)
    assert len(survivor) == 300
    assert survivor.search(queries, k=5) == expected


def test_missing_or_corrupt_files_are_named(tmp_path, corpus) -> None:
    docs, doc_ids = corpus
    with pytest.raises(FileNotFoundError, match="no index directory"):
        DenseIndex.load(tmp_path / "nowhere")

    DenseIndex(docs, doc_ids, FINGERPRINT).save(tmp_path / "idx")
    (tmp_path / "idx" / "index.faiss").write_bytes(b"not a faiss index")
    with pytest.raises(ValueError, match=r"index\.faiss is corrupt"):
        DenseIndex.load(tmp_path / "idx")

    (tmp_path / "idx" / "meta.json").write_text("{ half", encoding="utf-8")
    with pytest.raises(ValueError, match=r"meta\.json is corrupt"):
        DenseIndex.load(tmp_path / "idx")

    (tmp_path / "idx" / "doc_ids.json").unlink()
    (tmp_path / "idx" / "meta.json").write_text(
        json.dumps({"fingerprint": FINGERPRINT, "index_type": "flat", "dim": 24, "count": 300}),
        encoding="utf-8",
    )
    with pytest.raises(FileNotFoundError, match=r"doc_ids\.json is missing"):
        DenseIndex.load(tmp_path / "idx")


def test_inconsistent_files_are_reported(tmp_path, corpus) -> None:
    docs, doc_ids = corpus
    DenseIndex(docs, doc_ids, FINGERPRINT).save(tmp_path / "idx")
    (tmp_path / "idx" / "doc_ids.json").write_text(json.dumps(doc_ids[:-1]), encoding="utf-8")
    with pytest.raises(ValueError, match="inconsistent"):
        DenseIndex.load(tmp_path / "idx")


@pytest.mark.parametrize(
    ("embeddings", "doc_ids", "message"),
    [
        (np.zeros(4, dtype=np.float32), ["a"], "2-D"),
        (np.zeros((2, 3, 4), dtype=np.float32), ["a", "b"], "2-D"),
        (np.zeros((0, 4), dtype=np.float32), [], "no rows"),
        (np.ones((3, 4), dtype=np.float32), ["a", "b"], "2 doc_ids for 3"),
        (np.ones((3, 4), dtype=np.float32), ["a", "b", "a"], "unique"),
        (np.ones((2, 4), dtype=np.float32), ["a", 2], "strings"),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ["a", "b"], "NaN"),
        (np.array([["x", "y"]]), ["a"], "numbers"),
    ],
)
def test_bad_build_input(embeddings, doc_ids, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DenseIndex(embeddings, doc_ids, FINGERPRINT)


def test_bad_build_options(corpus) -> None:
    docs, doc_ids = corpus
    with pytest.raises(ValueError, match="unknown index_type"):
        DenseIndex(docs, doc_ids, FINGERPRINT, IndexConfig(index_type="annoy"))
    with pytest.raises(ValueError, match="unknown dtype 'bfloat16'"):
        DenseIndex(docs, doc_ids, FINGERPRINT, IndexConfig(embedding_dtype="bfloat16"))
    with pytest.raises(ValueError, match="beyond float16's range"):
        DenseIndex(docs * 1e5, doc_ids, FINGERPRINT, IndexConfig(embedding_dtype="float16"))
    with pytest.raises(ValueError, match="fingerprint"):
        DenseIndex(docs, doc_ids, "")
    with pytest.raises(ValueError, match="JSON"):
        DenseIndex(docs, doc_ids, FINGERPRINT, metadata={"when": object()})


def test_bad_search_input(corpus) -> None:
    docs, doc_ids = corpus
    index = DenseIndex(docs, doc_ids, FINGERPRINT)
    with pytest.raises(ValueError, match="dimension 23"):
        index.search(docs[:2, :23], k=3)
    with pytest.raises(ValueError, match="reshape"):
        index.search(docs[0], k=3)
    with pytest.raises(ValueError, match="1 query_ids for 2"):
        index.search(docs[:2], k=3, query_ids=["q"])
    with pytest.raises(ValueError, match="unique"):
        index.search(docs[:2], k=3, query_ids=["q", "q"])
    with pytest.raises(ValueError, match="exclude_self needs query_ids"):
        index.search(docs[:2], k=3, exclude_self=True)
    for bad_k in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="k must be a positive integer"):
            index.search(docs[:2], k=bad_k)
    with pytest.raises(ValueError, match="batch_size"):
        index.search(docs[:2], k=3, batch_size=0)


# --------------------------------------------------------------------------------------------------
# float16 storage


def _index_file_size(index: DenseIndex, directory) -> int:
    index.save(directory)
    return (directory / "index.faiss").stat().st_size


def test_float16_flat_index_ranks_like_float32_in_half_the_space(tmp_path) -> None:
    rng = np.random.default_rng(7)
    docs = _normalized(rng, 2000, 128)
    queries = _normalized(rng, 100, 128)
    doc_ids = [f"d{i}" for i in range(2000)]
    full = DenseIndex(docs, doc_ids, FINGERPRINT)
    half = DenseIndex(docs, doc_ids, FINGERPRINT, IndexConfig(embedding_dtype="float16"))
    assert (full.dtype, half.dtype) == ("float32", "float16")
    expected, run = full.search(queries, k=10), half.search(queries, k=10)
    exact = queries @ docs.T
    for qi, qid in enumerate(expected):
        shared = set(expected[qid]) & set(run[qid])
        assert len(shared) >= 9  # only near-ties may swap in or out
        assert all(abs(run[qid][doc] - expected[qid][doc]) < 1e-3 for doc in shared)
        # Every float16 hit is within rounding of the true top 10.
        tenth = min(expected[qid].values())
        assert all(exact[qi, int(doc[1:])] >= tenth - 1e-3 for doc in run[qid])

    ratio = _index_file_size(half, tmp_path / "half") / _index_file_size(full, tmp_path / "full")
    assert 0.49 < ratio < 0.51

    vectors = half.vectors(5, 15)
    assert vectors.dtype == np.float32 and vectors.flags.writeable  # a float32 copy, not a view
    np.testing.assert_allclose(vectors, docs[5:15], atol=1e-3)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_float16_save_load_round_trip(tmp_path, corpus, index_type: str) -> None:
    docs, doc_ids = corpus
    index = DenseIndex(
        docs, doc_ids, FINGERPRINT, IndexConfig(index_type=index_type, embedding_dtype="float16")
    )
    queries = _normalized(np.random.default_rng(8), 25, 24)
    before = index.search(queries, k=10)
    index.save(tmp_path / "idx")
    meta = json.loads((tmp_path / "idx" / "meta.json").read_text(encoding="utf-8"))
    assert (meta["index_type"], meta["dtype"]) == (index_type, "float16")

    loaded = DenseIndex.load(tmp_path / "idx", expected_fingerprint=FINGERPRINT)
    assert (loaded.index_type, loaded.dtype) == (index_type, "float16")
    assert loaded.search(queries, k=10) == before
    np.testing.assert_array_equal(loaded.vectors(), index.vectors())
    in_memory = DenseIndex.load(tmp_path / "idx", mmap=False)
    assert in_memory.search(queries, k=10) == before


def test_float16_flat_index_is_memory_mapped(tmp_path, corpus) -> None:
    docs, doc_ids = corpus
    DenseIndex(docs, doc_ids, FINGERPRINT, IndexConfig(embedding_dtype="float16")).save(tmp_path / "idx")
    loaded = DenseIndex.load(tmp_path / "idx")
    # FAISS owns no copy of the codes: they are the mapped file, which exact search reads directly.
    assert not loaded._index.codes.is_owned
    assert loaded._vectors.dtype == np.float16
    assert DenseIndex.load(tmp_path / "idx", mmap=False)._index.codes.is_owned
    assert loaded.search(docs[:5], 7) == DenseIndex(
        docs, doc_ids, FINGERPRINT, IndexConfig(embedding_dtype="float16")
    ).search(docs[:5], 7)


def test_meta_without_dtype_loads_as_float32(tmp_path, corpus) -> None:
    docs, doc_ids = corpus
    index = DenseIndex(docs, doc_ids, FINGERPRINT)
    index.save(tmp_path / "idx")
    meta_path = tmp_path / "idx" / "meta.json"
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    del meta["dtype"]  # as written before float16 storage existed
    meta_path.write_text(json.dumps(meta), encoding="utf-8")
    loaded = DenseIndex.load(tmp_path / "idx")
    assert loaded.dtype == "float32"
    assert loaded.search(docs[:5], 7) == index.search(docs[:5], 7)


@pytest.mark.parametrize("index_type", ["flat", "hnsw", "ivf"])
def test_dtype_in_meta_must_match_the_faiss_index(tmp_path, corpus, index_type: str) -> None:
    docs, doc_ids = corpus
    for built, claimed in (("float16", "float32"), ("float32", "float16"), ("float32", "int8")):
        directory = tmp_path / f"{built}-as-{claimed}"
        DenseIndex(
            docs, doc_ids, FINGERPRINT, IndexConfig(index_type=index_type, embedding_dtype=built)
        ).save(directory)
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
        meta["dtype"] = claimed
        (directory / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
        message = "unknown dtype" if claimed == "int8" else f"says '{index_type}' with {claimed} embeddings"
        with pytest.raises(ValueError, match=message):
            DenseIndex.load(directory)


def test_float16_approximate_indexes_find_the_exact_neighbours(corpus) -> None:
    docs, doc_ids = corpus
    queries = _normalized(np.random.default_rng(9), 30, 24)
    exact = DenseIndex(docs, doc_ids, FINGERPRINT).search(queries, k=10)
    for index_type in ("hnsw", "ivf"):
        index = DenseIndex(
            docs, doc_ids, FINGERPRINT, IndexConfig(index_type=index_type, embedding_dtype="float16")
        )
        approx = index.search(queries, k=10)
        assert np.mean([len(set(exact[q]) & set(approx[q])) / 10 for q in exact]) >= 0.9
        np.testing.assert_allclose(index.vectors(), docs, atol=1e-3)
