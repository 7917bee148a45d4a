"""FAISS indexes of each type and storage dtype: build them, recognise them on load, view their vectors."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import faiss
import numpy as np

from sbmoe.core.choices import EMBEDDING_DTYPES, INDEX_TYPES
from sbmoe.core.errors import MissingInputError, UsageError

_HNSW_M = 32
# k-means of an IVF index trains on at most this many points per cell (FAISS advises 30 to 256;
# 40 instead of 64 cost 0.03 recall@10 at the same nprobe in bench/bench_ann.py).
_IVF_TRAINING_POINTS_PER_LIST = 64
_IVF_TRAINING_SEED = 1234
# Rows added to a FAISS index at a time when building from shards (bounds the extra memory).
ADD_CHUNK = 1 << 18
_FLOAT16_MAX = float(np.finfo(np.float16).max)


def default_nlist(count: int) -> int:
    """IVF cells for ``count`` vectors: about ``2 * sqrt(count)``, with at least 39 vectors per cell.

    Fewer cells than FAISS's usual ``4 * sqrt(n)`` keep k-means affordable on CPUs (1M vectors:
    2,000 cells); ``nprobe`` then scans a larger share of each cell.
    """
    return max(1, min(round(2 * math.sqrt(count)), count // 39))


def default_nprobe(nlist: int) -> int:
    """IVF cells searched per query: ``2 * sqrt(nlist)`` (at most ``nlist``).

    Larger corpora cluster better, so a shrinking share of the cells keeps recall@10 near 0.95:
    ~0.96 on 1M clustered 384-d vectors (90 of 2,000 cells, ``bench/bench_ann.py``), ~0.93 for
    all-MiniLM-L6-v2 queries on SciFact's 5k documents (23 of 132 cells).
    """
    return max(1, min(nlist, math.ceil(2 * math.sqrt(nlist))))


# The FAISS class of each (index type, dtype); the float16 ones use the fp16 scalar quantizer.
INDEX_CLASSES = {
    ("flat", "float32"): faiss.IndexFlatIP,
    ("hnsw", "float32"): faiss.IndexHNSWFlat,
    ("ivf", "float32"): faiss.IndexIVFFlat,
    ("flat", "float16"): faiss.IndexScalarQuantizer,
    ("hnsw", "float16"): faiss.IndexHNSWSQ,
    ("ivf", "float16"): faiss.IndexIVFScalarQuantizer,
}


def build_faiss_index(
    index_type: str,
    dtype: str,
    dim: int,
    count: int,
    chunks: Callable[[], Iterator[np.ndarray]],
    nlist: int | None = None,
) -> faiss.Index:
    """A FAISS index of ``index_type`` holding the ``count`` vectors that ``chunks()`` yields, in order.

    ``chunks`` is called once more to draw the training sample of an IVF index, so vectors can
    stream from disk (shards) instead of being held in memory all at once.
    """
    if index_type not in INDEX_TYPES:
        raise UsageError(f"unknown index_type {index_type!r}; choose one of {', '.join(INDEX_TYPES)}")
    if dtype not in EMBEDDING_DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(EMBEDDING_DTYPES)}")
    if index_type != "ivf" and nlist is not None:
        raise UsageError(f"nlist applies to ivf indexes, not {index_type!r}")
    fp16 = faiss.ScalarQuantizer.QT_fp16
    ip = faiss.METRIC_INNER_PRODUCT
    if index_type == "flat":
        index = faiss.IndexFlatIP(dim) if dtype == "float32" else faiss.IndexScalarQuantizer(dim, fp16, ip)
    elif index_type == "hnsw":
        if dtype == "float32":
            index = faiss.IndexHNSWFlat(dim, _HNSW_M, ip)
        else:
            index = faiss.IndexHNSWSQ(dim, fp16, _HNSW_M, ip)
    else:
        nlist = default_nlist(count) if nlist is None else nlist
        check_positive(nlist, "nlist")
        if nlist > count:
            raise UsageError(f"nlist={nlist} is more IVF cells than the {count} vectors to index")
        if dtype == "float32":
            index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, ip)
        else:
            # By residual (the default): the fp16 codes hold each vector minus its cell's centroid.
            index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(dim), dim, nlist, fp16, ip)
        index.cp.seed = _IVF_TRAINING_SEED
        index.train(_training_sample(chunks, count, nlist * _IVF_TRAINING_POINTS_PER_LIST))
    # The fp16 scalar quantizer needs no training; FAISS only marks it untrained for HNSW.
    if not index.is_trained:
        index.train(np.zeros((0, dim), dtype=np.float32))
    for chunk in chunks():
        for start in range(0, len(chunk), ADD_CHUNK):
            rows = np.ascontiguousarray(chunk[start : start + ADD_CHUNK], dtype=np.float32)
            if dtype == "float16" and len(rows) and np.abs(rows).max() > _FLOAT16_MAX:
                raise UsageError(
                    f"embeddings hold values beyond float16's range (+-{_FLOAT16_MAX:g}); "
                    f"store them as float32"
                )
            index.add(rows)
    if index.ntotal != count:
        raise UsageError(f"expected {count} vectors, got {index.ntotal}")
    return index


def _training_sample(chunks: Callable[[], Iterator[np.ndarray]], count: int, size: int) -> np.ndarray:
    """A seeded uniform sample of ``size`` rows (all rows if there are fewer), in row order."""
    if size >= count:
        return np.concatenate([np.asarray(c, dtype=np.float32) for c in chunks()])
    rows = np.sort(np.random.default_rng(_IVF_TRAINING_SEED).choice(count, size, replace=False))
    picked, offset = [], 0
    for chunk in chunks():
        inside = rows[(rows >= offset) & (rows < offset + len(chunk))] - offset
        picked.append(np.asarray(chunk[inside], dtype=np.float32))
        offset += len(chunk)
    return np.ascontiguousarray(np.concatenate(picked))


def is_faiss_index_of(index: faiss.Index, index_type: str, dtype: str) -> bool:
    """Whether ``index`` is the inner-product FAISS index that ``index_type`` and ``dtype`` build."""
    if not isinstance(index, INDEX_CLASSES[index_type, dtype]):
        return False
    if index.metric_type != faiss.METRIC_INNER_PRODUCT:
        return False
    if dtype == "float16":
        quantized = faiss.downcast_index(index.storage) if index_type == "hnsw" else index
        return quantized.sq.qtype == faiss.ScalarQuantizer.QT_fp16
    return True


class _BorrowedMemory:
    """Hands numpy an array over memory that a FAISS index owns, and keeps that index alive.

    ``faiss.rev_swig_ptr`` arrays do not reference the index: one that outlived it (``vectors()`` of
    a temporary index) read freed or unmapped memory.
    """

    def __init__(self, array: np.ndarray, owner: faiss.Index) -> None:
        self.__array_interface__ = array.__array_interface__
        self.owner = owner


def flat_vectors(index: faiss.Index) -> np.ndarray:
    """A zero-copy ``(ntotal, d)`` view of the vectors of a FAISS flat or HNSW index.

    float32 for ``IndexFlat`` storage; float16 for fp16 ``IndexScalarQuantizer`` storage, whose codes
    are the vectors' IEEE half-precision values, row after row. The view keeps ``index`` alive.
    """
    storage = faiss.downcast_index(index.storage) if isinstance(index, faiss.IndexHNSW) else index
    if isinstance(storage, faiss.IndexScalarQuantizer):
        codes = faiss.rev_swig_ptr(storage.codes.data(), storage.ntotal * storage.code_size)
        array = codes.view(np.float16).reshape(storage.ntotal, storage.d)
    else:
        array = faiss.rev_swig_ptr(storage.get_xb(), storage.ntotal * storage.d)
        array = array.reshape(storage.ntotal, storage.d)
    return np.asarray(_BorrowedMemory(array, index))


def read_faiss_index(
    index_path: Path, meta_path: Path, index_type: str, dtype: str, mmap: bool
) -> faiss.Index:
    """The FAISS index at ``index_path``, checked to be what ``meta_path`` says (``index_type``, ``dtype``).

    ``mmap`` maps the file instead of reading it (the vectors of ``flat`` and ``hnsw`` indexes stay
    on disk until search touches them).
    """
    if not index_path.is_file():
        raise MissingInputError(f"{index_path} is missing; rebuild the index with `sbmoe index ...`")
    try:
        index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"{index_path} is corrupt or not a FAISS index ({reason}); rebuild it with `sbmoe index ...`"
        ) from error
    if not is_faiss_index_of(index, index_type, dtype):
        expected = INDEX_CLASSES[index_type, dtype].__name__
        expected += " with the fp16 scalar quantizer" if dtype == "float16" else ""
        raise UsageError(
            f"{index_path} holds a {type(index).__name__} but {meta_path} says "
            f"{index_type!r} with {dtype} embeddings, which is an inner-product {expected}; "
            f"were the files of two indexes mixed?"
        )
    return index


def check_positive(value: int, name: str) -> None:
    """Refuse ``value`` unless it is a positive integer (``bool`` is not), naming it ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")
