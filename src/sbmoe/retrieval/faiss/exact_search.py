"""Exact top-k inner-product search over a matrix of vectors, with ties ordered by row."""

from __future__ import annotations

import faiss
import numpy as np

from sbmoe.core.errors import UsageError

# Exact search holds at most this many float32 scores at once (queries in a batch x documents in a
# block); argpartition adds twice as many bytes of int64 positions. Over float16 vectors it also
# converts at most this many values to float32 at once.
_SCORE_BLOCK = 1 << 24


def exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products: ``(scores, rows)``, each ``(n_queries, k)``, best first.

    One query is scored by FAISS's SIMD scan (:func:`_scores`), several by one matrix product.
    Why not ``IndexFlatIP.search`` for batches: faiss-cpu 1.15 scans the corpus once per query, without BLAS,
    whenever ``n_queries * dim < 128000`` (300 x 384 falls below), and its wheel bundles OpenBLAS
    0.3.15, which misdetects recent Xeons and runs SSE3 kernels. NumPy's matrix product plus
    argpartition was about 3x faster there (300 x 5k x 384: 13 ms vs 38-45 ms on 2 cores), returns the
    same neighbours up to float rounding, and orders tied scores by row.
    The corpus is processed in blocks so memory stays bounded however large it is; float16 vectors
    are converted to float32 a block at a time, so scores are float32 products either way.
    """
    block = max(k, _SCORE_BLOCK // max(len(queries), 1))
    if vectors.dtype != np.float32:
        block = min(block, max(k, _SCORE_BLOCK // vectors.shape[1]))
    best: tuple[np.ndarray, np.ndarray] | None = None
    for start in range(0, len(vectors), block):
        scores = _scores(queries, vectors[start : start + block])
        rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        top = select_top_k(scores, rows, k)
        if best is not None:
            top = select_top_k(np.hstack([best[0], top[0]]), np.hstack([best[1], top[1]]), k)
        best = top
    assert best is not None  # callers never pass an empty corpus
    return best


def select_top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per line, the ``k`` best ``(score, row)`` pairs by descending score then ascending row."""
    width = scores.shape[1]
    if k < width:
        picked = np.argpartition(scores, width - k, axis=1)[:, width - k :]
        kth = np.take_along_axis(scores, picked, axis=1).min(axis=1)
        # argpartition picks arbitrarily among scores tied with the k-th best; redo those lines so
        # the lowest rows win, as they would in a full sort.
        for line in np.flatnonzero(np.count_nonzero(scores >= kth[:, None], axis=1) > k):
            candidates = np.flatnonzero(scores[line] >= kth[line])
            order = np.lexsort((rows[line, candidates], -scores[line, candidates]))
            picked[line] = candidates[order[:k]]
        scores = np.take_along_axis(scores, picked, axis=1)
        rows = np.take_along_axis(rows, picked, axis=1)
    # By row, then stably by descending score: np.lexsort does the same but is several times slower.
    order = np.argsort(rows, axis=1)  # rows are unique within a line, so any sort is stable
    order = np.take_along_axis(
        order, np.argsort(-np.take_along_axis(scores, order, axis=1), axis=1, kind="stable"), axis=1
    )
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(rows, order, axis=1)


def _scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """The inner products ``(n_queries, rows)`` of float32 ``queries`` with a block of ``vectors``.

    NumPy hands only aligned arrays to BLAS, and a memory-mapped FAISS file puts its vectors at an
    odd offset: on such a view the matrix product falls back to a loop (one query against 5k x 384:
    9 ms instead of 0.1). One float32 query is therefore scored by FAISS's SIMD scan, which reads the
    vectors where they lie, with no copy; a batch copies a misaligned block once (cheap against its
    matrix product); float16 vectors are converted a block at a time.
    """
    if len(queries) == 1 and vectors.dtype == np.float32:
        scores = np.empty((1, len(vectors)), dtype=np.float32)
        query = np.ascontiguousarray(queries[0], dtype=np.float32)
        vectors = np.ascontiguousarray(vectors)  # FAISS reads raw rows: a view must be contiguous
        faiss.fvec_inner_products_ny(
            faiss.swig_ptr(scores),
            faiss.swig_ptr(query),
            faiss.swig_ptr(vectors),
            vectors.shape[1],
            len(vectors),
        )
        return scores
    return queries @ np.require(vectors, np.float32, "A").T


def as_matrix(array: np.ndarray, name: str) -> np.ndarray:
    """``array`` as a C-contiguous float32 ``(rows, dim)`` matrix of finite numbers; refused otherwise."""
    matrix = np.asarray(array)
    if matrix.ndim != 2:
        hint = " (use x.reshape(1, -1) for a single vector)" if matrix.ndim == 1 else ""
        raise UsageError(f"{name} must be a 2-D array (rows, dim), got shape {matrix.shape}{hint}")
    if matrix.shape[1] == 0:
        raise UsageError(f"{name} has dimension 0")
    if not (np.issubdtype(matrix.dtype, np.floating) or np.issubdtype(matrix.dtype, np.integer)):
        raise UsageError(f"{name} must hold numbers, got dtype {matrix.dtype}")
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    if not np.isfinite(matrix).all():
        bad = int(np.flatnonzero(~np.isfinite(matrix).all(axis=1))[0])
        raise UsageError(f"{name} has NaN or infinite values (first in row {bad})")
    return matrix
