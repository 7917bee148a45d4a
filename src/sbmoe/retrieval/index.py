"""A FAISS index of document embeddings: build, batched top-k search, atomic save and checked load.

An index directory holds three files:

* ``index.faiss``: the FAISS index (``faiss.write_index``), readable by any FAISS tool; loaded
  memory-mapped, so the vectors of an exact index are paged in from disk as search needs them;
* ``doc_ids.json``: the document id of each row, in row order;
* ``meta.json``: the fingerprint of the model that made the embeddings, index type, embedding
  dtype, dimension, document count, search settings, creation time, versions, caller metadata, and
  a checksum of the other two files (size, SHA-256, SHA-256 of a sample), checked on every load
  by size and sample and in full with ``verify``.

Index types: ``flat`` (exact, the default), ``hnsw`` (graph) and ``ivf`` (inverted lists over
k-means cells), the last two approximate and faster on large corpora. Each stores the embeddings as
``float32`` (the default) or ``float16`` (FAISS's fp16 scalar quantizer: half the memory and disk,
scores of unit vectors move by less than 5e-4).

A corpus too large for one process is indexed in shards: a *sharded* index is a directory of such
index directories, ``shard-00000-of-00004/`` ..., each written by :meth:`DenseIndex.save_shard`.
This module defines that layout (:func:`shard_directory`, :func:`is_sharded_index`) so that a single
index can tell it apart; :mod:`sbmoe.retrieval.shards` builds on this module to search and merge shards.

Scores are inner products of the vectors as given; normalising them (cosine similarity) is the
encoder's job.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sbmoe import __version__
from sbmoe.core.choices import EMBEDDING_DTYPES, INDEX_TYPES
from sbmoe.core.errors import MissingInputError, SbmoeError, UsageError
from sbmoe.core.io import atomic_directory, write_json
from sbmoe.core.runs import Run

INDEX_FILE = "index.faiss"
DOC_IDS_FILE = "doc_ids.json"
META_FILE = "meta.json"
FORMAT_VERSION = 1
SHARD_PATTERN = re.compile(r"^shard-(\d+)-of-(\d+)$")

_HNSW_M = 32
# FAISS searches HNSW graphs with efSearch=16 by default, too narrow for top-100 retrieval.
_HNSW_EF_SEARCH = 128
# k-means of an IVF index trains on at most this many points per cell (FAISS advises 30 to 256;
# 40 instead of 64 cost 0.03 recall@10 at the same nprobe in bench/bench_ann.py).
_IVF_TRAINING_POINTS_PER_LIST = 64
_IVF_TRAINING_SEED = 1234
# Rows added to a FAISS index at a time when building from shards (bounds the extra memory).
_ADD_CHUNK = 1 << 18
# Exact search holds at most this many float32 scores at once (queries in a batch x documents in a
# block); argpartition adds twice as many bytes of int64 positions. Over float16 vectors it also
# converts at most this many values to float32 at once.
_SCORE_BLOCK = 1 << 24
_FLOAT16_MAX = float(np.finfo(np.float16).max)
# The cheap check on load hashes this many blocks of this many bytes, spread over the file.
_SAMPLE_BLOCKS = 64
_SAMPLE_BYTES = 4096


class IndexMismatchError(SbmoeError, ValueError):
    """The index on disk was built from a different model's embeddings than the one in use."""

    def __init__(self, directory: str | os.PathLike, found: str, expected: str) -> None:
        self.directory = Path(directory)
        self.found = found
        self.expected = expected
        # 12 characters identify a hash; show more only if they do not tell the two apart.
        width = 12 if found[:12] != expected[:12] else max(len(found), len(expected))
        super().__init__(
            f"The index at {self.directory} was built by a different model: its fingerprint is "
            f"{found[:width]}, the current model's is {expected[:width]}. Its embeddings are not "
            f"comparable with this model's queries. Rebuild it with the current model: "
            f"`sbmoe index --model <model> ... --output {self.directory}`."
        )


def check_fingerprint(
    directory: str | os.PathLike, meta: Mapping[str, Any], expected: str | Sequence[str] | None
) -> None:
    """Refuse an index whose documents are not embedded as the querying model expects.

    Args:
        directory: The index (for the message).
        meta: Its ``meta.json``.
        expected: The querying model's fingerprint, or every fingerprint it accepts, the most
            telling first (:meth:`~sbmoe.model.retriever.Retriever.index_fingerprints`): an index
            matches when the fingerprint of its builder or of its documents is among them.

    Raises:
        IndexMismatchError: it does not match.
    """
    if expected is None:
        return
    accepted = [expected] if isinstance(expected, str) else list(expected)
    held = {meta["fingerprint"], (meta.get("metadata") or {}).get("document_fingerprint")}
    if not held & set(accepted):
        raise IndexMismatchError(directory, str(meta["fingerprint"]), accepted[0])


def shard_directory(root: str | os.PathLike, shard: int, num_shards: int) -> Path:
    """Where shard ``shard`` of ``num_shards`` lives inside the sharded index ``root``."""
    return Path(root) / f"shard-{shard:05d}-of-{num_shards:05d}"


def is_sharded_index(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds shard directories (and no single index of its own)."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / META_FILE).exists():
        return False
    return any(SHARD_PATTERN.match(entry.name) and entry.is_dir() for entry in directory.iterdir())


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked ``meta.json`` of an index directory; ``dtype`` is filled in for older indexes.

    Raises:
        FileNotFoundError: there is no ``meta.json``.
        ValueError: it is corrupt: not JSON, not an object, a required entry missing or unknown.
    """
    meta_path = Path(directory) / META_FILE
    meta = _read_json_file(meta_path)
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_path} is corrupt: expected a JSON object")
    missing = [key for key in ("fingerprint", "index_type", "dim", "count") if key not in meta]
    if missing:
        raise UsageError(f"{meta_path} is corrupt: missing {', '.join(missing)}")
    if not isinstance(meta["fingerprint"], str) or not meta["fingerprint"]:
        raise UsageError(f"{meta_path} is corrupt: fingerprint must be a non-empty string")
    if meta["index_type"] not in INDEX_TYPES:
        raise UsageError(f"{meta_path}: unknown index_type {meta['index_type']!r}")
    # Indexes saved before float16 storage existed have no dtype: they are float32.
    meta.setdefault("dtype", "float32")
    if meta["dtype"] not in EMBEDDING_DTYPES:
        raise UsageError(
            f"{meta_path}: unknown dtype {meta['dtype']!r}; expected one of {', '.join(EMBEDDING_DTYPES)}"
        )
    return meta


def read_doc_ids(directory: str | os.PathLike) -> tuple[str, ...]:
    """The checked document ids of an index directory, in row order."""
    ids_path = Path(directory) / DOC_IDS_FILE
    raw_ids = _read_json_file(ids_path)
    if not isinstance(raw_ids, list):
        raise UsageError(f"{ids_path} is corrupt: expected a JSON list of document ids")
    try:
        return check_ids(raw_ids, "doc_ids")
    except ValueError as error:
        raise UsageError(f"{ids_path} is corrupt: {error}") from None


def check_ids(ids: Sequence[str], name: str) -> tuple[str, ...]:
    """``ids`` as a tuple, checked to be unique strings; the error names them ``name``."""
    if isinstance(ids, str):
        raise UsageError(f"{name} must be a sequence of strings, not a single string")
    result = tuple(ids)
    for value in result:
        if not isinstance(value, str):
            raise UsageError(f"{name} must all be strings, found {value!r} ({type(value).__name__})")
    if len(set(result)) != len(result):
        repeated = [value for value, count in Counter(result).items() if count > 1]
        shown = ", ".join(repr(value) for value in repeated[:5])
        raise UsageError(f"{name} must be unique; {len(repeated)} repeat, e.g. {shown}")
    return result


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


class DenseIndex:
    """Document embeddings in a FAISS inner-product index, searched in batches.

    Args:
        embeddings: ``(n_docs, dim)`` array; converted to float32.
        doc_ids: one unique id per row of ``embeddings``.
        fingerprint: identifies the model that produced the embeddings; :meth:`load` checks it.
        index_type: ``"flat"`` (``faiss.IndexFlatIP``, exact), ``"hnsw"``
            (``faiss.IndexHNSWFlat`` with M=32) or ``"ivf"`` (``faiss.IndexIVFFlat``: k-means
            cells, ``nprobe`` of them searched); the last two are approximate and faster on large
            corpora.
        dtype: How the index stores the embeddings: ``"float32"`` or ``"float16"`` (half the
            memory and disk; ``faiss.IndexScalarQuantizer``, ``faiss.IndexHNSWSQ`` or
            ``faiss.IndexIVFScalarQuantizer`` with ``QT_fp16``). Queries and scores stay float32;
            rounding unit-length embeddings to float16 moves their scores by less than
            2^-11 (about 5e-4). Exact search converts the vectors to float32 a block at a time for
            each batch of queries: as fast as float32 for batches of hundreds of queries, several
            times slower one query at a time (300k x 384: 1.05 s vs 0.13 s on 2 cores).
        metadata: JSON-serialisable extras stored in ``meta.json`` (dataset, encoder settings, ...).
        nlist: IVF only: number of cells (default :func:`default_nlist`).
        nprobe: IVF only: cells searched per query (default :func:`default_nprobe`); saved with the
            index and changeable later through :attr:`nprobe`.

    Raises:
        ValueError: bad shapes, non-finite values, missing, duplicate or non-string ids, an empty
            fingerprint, an unknown index type or dtype, embeddings beyond float16's range (for
            ``dtype="float16"``), bad IVF settings, or metadata that is not JSON-serialisable.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        doc_ids: Sequence[str],
        fingerprint: str,
        index_type: str = "flat",
        metadata: Mapping[str, Any] | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        dtype: str = "float32",
    ) -> None:
        vectors = _as_matrix(embeddings, "embeddings")
        if vectors.shape[0] == 0:
            raise UsageError("embeddings has no rows: there is nothing to index")
        ids = check_ids(doc_ids, "doc_ids")
        if len(ids) != vectors.shape[0]:
            raise UsageError(
                f"got {len(ids)} doc_ids for {vectors.shape[0]} embedding rows; they must match one to one"
            )
        index = _build_faiss_index(
            index_type, dtype, vectors.shape[1], len(ids), lambda: iter([vectors]), nlist
        )
        self._attach(index, ids, fingerprint, index_type, dtype, metadata, nprobe)

    @classmethod
    def from_chunks(
        cls,
        chunks: Callable[[], Iterator[np.ndarray]],
        doc_ids: Sequence[str],
        fingerprint: str,
        dim: int,
        index_type: str = "flat",
        metadata: Mapping[str, Any] | None = None,
        nlist: int | None = None,
        nprobe: int | None = None,
        dtype: str = "float32",
    ) -> DenseIndex:
        """An index over embeddings that arrive in row-order chunks, never all in memory at once.

        Args:
            chunks: Returns a fresh iterator over ``(rows, dim)`` arrays each time it is called
                (twice for ``ivf``: once to draw the k-means sample, once to add the vectors).
            doc_ids: One unique id per row over all chunks.
            dim: Embedding dimension.

        The other arguments are those of :class:`DenseIndex`.
        """
        ids = check_ids(doc_ids, "doc_ids")
        index = _build_faiss_index(index_type, dtype, dim, len(ids), chunks, nlist)
        return cls._from_faiss(index, ids, fingerprint, index_type, dtype, metadata, nprobe)

    def _attach(
        self,
        index: faiss.Index,
        doc_ids: tuple[str, ...],
        fingerprint: str,
        index_type: str,
        dtype: str,
        metadata: Mapping[str, Any] | None,
        nprobe: int | None = None,
    ) -> None:
        if nprobe is not None and index_type != "ivf":
            raise UsageError(f"nprobe applies to ivf indexes, not {index_type!r}")
        if not isinstance(fingerprint, str) or not fingerprint:
            raise UsageError(f"fingerprint must be a non-empty string, got {fingerprint!r}")
        metadata = dict(metadata or {})
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as error:
            raise UsageError(f"metadata must be JSON-serialisable: {error}") from None
        self._index = index
        self._doc_ids = doc_ids
        # Maps a whole (queries, k) array of rows to ids in one vectorised lookup.
        self._id_array = np.array(doc_ids, dtype=object)
        self.fingerprint = fingerprint
        self.index_type = index_type
        self.dtype = dtype
        self.metadata = metadata
        self._vectors: np.ndarray | None = None
        self._nprobe: int | None = None
        if index_type == "flat":
            # A zero-copy view of the vectors inside the FAISS index (float16 ones too), for
            # _exact_top_k.
            self._vectors = _flat_vectors(index)
        if index_type == "ivf":
            self.nprobe = nprobe if nprobe is not None else default_nprobe(index.nlist)

    @property
    def nprobe(self) -> int | None:
        """IVF cells searched per query (``None`` for other index types); settable."""
        return self._nprobe

    @nprobe.setter
    def nprobe(self, value: int) -> None:
        if self.index_type != "ivf":
            raise UsageError(f"nprobe applies to ivf indexes, this one is {self.index_type!r}")
        _check_positive(value, "nprobe")
        self._nprobe = min(int(value), int(self._index.nlist))

    @property
    def nlist(self) -> int | None:
        """IVF cells (``None`` for other index types)."""
        return int(self._index.nlist) if self.index_type == "ivf" else None

    def vectors(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """The stored embeddings of rows ``start:stop`` as a float32 ``(rows, dim)`` array.

        A read-only view into the index (memory-mapped after :meth:`load`) for float32 ``flat`` and
        ``hnsw`` indexes; a copy for ``ivf``, whose vectors live in their cells, and for float16
        indexes (converted to float32, twice the bytes they take in the index).
        """
        stop = len(self) if stop is None else min(stop, len(self))
        if not 0 <= start <= stop:
            raise UsageError(f"bad row range {start}:{stop} for an index of {len(self)} rows")
        if self.index_type == "ivf":
            if self._index.direct_map.type == faiss.DirectMap.NoMap:
                self._index.make_direct_map()
            return self._index.reconstruct_n(start, stop - start)
        view = _flat_vectors(self._index)[start:stop]
        if view.dtype != np.float32:
            return view.astype(np.float32)
        view.flags.writeable = False
        return view

    def iter_vectors(self, rows: int = _ADD_CHUNK) -> Iterator[np.ndarray]:
        """The stored embeddings as float32 arrays of ``rows`` rows, in row order (see :meth:`vectors`).

        Bounds the memory of the float32 copies that float16 and ``ivf`` indexes hand out.
        """
        _check_positive(rows, "rows")
        for start in range(0, len(self), rows):
            yield self.vectors(start, start + rows)

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self._index.d)

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """Document id of each row, in row order."""
        return self._doc_ids

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def __repr__(self) -> str:
        return (
            f"DenseIndex(index_type={self.index_type!r}, dtype={self.dtype!r}, count={len(self)}, "
            f"dim={self.dim}, fingerprint={self.fingerprint[:12]!r})"
        )

    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        query_ids: Sequence[str] | None = None,
        exclude_self: bool = False,
        batch_size: int = 1024,
    ) -> Run:
        """Return the top-``k`` documents of every query as a ranx-style run.

        Queries are searched ``batch_size`` at a time, each batch as one matrix operation.

        Args:
            query_embeddings: ``(n_queries, dim)`` array; converted to float32.
            k: documents per query; clamped to the corpus size.
            query_ids: one unique id per query; defaults to ``"0"``, ``"1"``, ...
            exclude_self: drop the document whose id equals the query's id (for corpora that search
                themselves, e.g. duplicate detection), still returning ``k`` documents when the
                corpus has enough.
            batch_size: queries per batch; bounds memory.

        Returns:
            query id -> doc id -> score, each query's documents best-first. On the flat index, equal
            scores are ordered by row (the order the documents were indexed in).

        Raises:
            ValueError: bad shapes, ids, ``k`` or ``batch_size``, or ``exclude_self`` without
                ``query_ids``.
        """
        queries = _as_matrix(query_embeddings, "query_embeddings")
        if queries.shape[1] != self.dim:
            raise UsageError(
                f"query_embeddings have dimension {queries.shape[1]} but the index holds "
                f"{self.dim}-dimensional vectors; were they made by the same model?"
            )
        if query_ids is None:
            if exclude_self:
                raise UsageError("exclude_self needs query_ids to compare with the doc ids")
            qids = tuple(str(i) for i in range(queries.shape[0]))
        else:
            qids = check_ids(query_ids, "query_ids")
            if len(qids) != queries.shape[0]:
                raise UsageError(f"got {len(qids)} query_ids for {queries.shape[0]} query embeddings")
        _check_positive(k, "k")
        _check_positive(batch_size, "batch_size")

        k = min(int(k), len(self))
        # One extra hit replaces the query itself when it is dropped.
        fetch = min(k + 1, len(self)) if exclude_self else k
        run: Run = {}
        for start in range(0, queries.shape[0], batch_size):
            scores, rows = self._search_batch(queries[start : start + batch_size], fetch)
            # FAISS pads with row -1 when an HNSW search finds fewer than k documents.
            padded = rows < 0
            names = self._id_array[np.where(padded, 0, rows)].tolist()
            for qid, row_names, row_scores, row_padded, has_pad in zip(
                qids[start : start + batch_size],
                names,
                scores.tolist(),
                padded.tolist(),
                padded.any(axis=1).tolist(),
                strict=True,
            ):
                pairs = zip(row_names, row_scores, strict=True)
                if has_pad:
                    pairs = [pair for pair, pad in zip(pairs, row_padded, strict=True) if not pad]
                if exclude_self:
                    pairs = [pair for pair in pairs if pair[0] != qid][:k]
                run[qid] = dict(pairs)
        return run

    def _search_batch(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._vectors is not None:
            return _exact_top_k(queries, self._vectors, k)
        if self.index_type == "ivf":
            return self._index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=self._nprobe))
        params = faiss.SearchParametersHNSW(efSearch=max(_HNSW_EF_SEARCH, k))
        return self._index.search(queries, k, params=params)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` atomically.

        The files are written to a temporary directory that replaces ``directory`` only once all of
        them are complete, so an interrupted save leaves any earlier index there intact.

        Returns:
            The directory written.
        """
        directory = Path(directory)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": self.fingerprint,
            "index_type": self.index_type,
            "dtype": self.dtype,
            "dim": self.dim,
            "count": len(self),
            **({"nlist": self.nlist, "nprobe": self.nprobe} if self.index_type == "ivf" else {}),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sbmoe_version": __version__,
            "faiss_version": faiss.__version__,
            "metadata": self.metadata,
        }
        with atomic_directory(directory) as tmp:
            faiss.write_index(self._index, str(tmp / INDEX_FILE))
            write_json(tmp / DOC_IDS_FILE, list(self._doc_ids))
            meta["checksum"] = {name: file_checksum(tmp / name) for name in (INDEX_FILE, DOC_IDS_FILE)}
            write_json(tmp / META_FILE, meta)
        return directory

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected_fingerprint: str | Sequence[str] | None = None,
        mmap: bool = True,
        verify: bool = False,
    ) -> DenseIndex:
        """Load an index written by :meth:`save`.

        Args:
            directory: the index directory.
            expected_fingerprint: fingerprint of the model that will encode the queries, or all
                those it accepts (see :func:`check_fingerprint`); when given, the index must match.
            mmap: map ``index.faiss`` into memory instead of reading it (``flat`` and ``hnsw``
                vectors stay on disk until search touches them, so an index larger than memory
                can be searched, and loading is instant).
            verify: check the whole of ``index.faiss`` and ``doc_ids.json`` against the checksum in
                ``meta.json``; otherwise only their sizes and a sample (indexes saved before
                checksums existed are not checked).

        Raises:
            IndexMismatchError: the index was built by a different model.
            FileNotFoundError: the directory or one of its files is missing.
            ValueError: a file is corrupt or the files disagree with each other, or the directory
                holds a sharded index (use :func:`sbmoe.retrieval.shards.load_index` or
                :class:`sbmoe.retrieval.shards.ShardedIndex`).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingInputError(f"no index directory at {directory}; build one with `sbmoe index ...`")
        if is_sharded_index(directory):
            raise UsageError(
                f"{directory} holds a sharded index: search it with sbmoe.retrieval.shards.load_index (or "
                f"ShardedIndex.load), or merge it into one with `sbmoe merge-index --index {directory} ...`"
            )

        meta_path = directory / META_FILE
        meta = read_meta(directory)
        dtype = meta["dtype"]
        # Checked before reading the (possibly large) index file.
        check_fingerprint(directory, meta, expected_fingerprint)
        verify_checksum(directory, meta, full=verify)
        doc_ids = read_doc_ids(directory)

        index_path = directory / INDEX_FILE
        if not index_path.is_file():
            raise MissingInputError(f"{index_path} is missing; rebuild the index with `sbmoe index ...`")
        try:
            index = faiss.read_index(str(index_path), faiss.IO_FLAG_MMAP_IFC if mmap else 0)
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
            raise UsageError(
                f"{index_path} is corrupt or not a FAISS index ({reason}); rebuild it with `sbmoe index ...`"
            ) from error

        if not _is_faiss_index_of(index, meta["index_type"], dtype):
            expected = _INDEX_CLASSES[meta["index_type"], dtype].__name__
            expected += " with the fp16 scalar quantizer" if dtype == "float16" else ""
            raise UsageError(
                f"{index_path} holds a {type(index).__name__} but {meta_path} says "
                f"{meta['index_type']!r} with {dtype} embeddings, which is an inner-product {expected}; "
                f"were the files of two indexes mixed?"
            )
        if not (index.ntotal == len(doc_ids) == meta["count"]) or index.d != meta["dim"]:
            raise UsageError(
                f"index directory {directory} is inconsistent: {INDEX_FILE} has {index.ntotal} vectors "
                f"of dimension {index.d}, {DOC_IDS_FILE} has {len(doc_ids)} ids, {META_FILE} says "
                f"{meta['count']} of dimension {meta['dim']}"
            )

        return cls._from_faiss(
            index,
            doc_ids,
            meta["fingerprint"],
            meta["index_type"],
            dtype,
            meta.get("metadata"),
            meta.get("nprobe"),
        )

    def save_shard(
        self, root: str | os.PathLike, shard: int, num_shards: int, start: int, total: int
    ) -> Path:
        """Save as shard ``shard`` of ``num_shards`` of a sharded index in ``root``.

        Args:
            root: The sharded index directory; this shard goes to :func:`shard_directory`.
            shard: This shard's number, ``0 <= shard < num_shards``.
            num_shards: How many shards make the whole corpus.
            start: Position of this shard's first document in the whole corpus.
            total: Documents in the whole corpus.

        Returns:
            The shard's directory.
        """
        root = Path(root)
        if (root / META_FILE).exists():
            raise UsageError(
                f"{root} holds a single (unsharded) index; write the shards to another directory "
                f"or delete it first"
            )
        if not 0 <= shard < num_shards:
            raise UsageError(f"shard must be in [0, {num_shards}), got {shard}")
        self.metadata["shard"] = {
            "index": shard,
            "count": num_shards,
            "start": start,
            "stop": start + len(self),
            "total": total,
        }
        return self.save(shard_directory(root, shard, num_shards))

    @classmethod
    def _from_faiss(
        cls,
        index: faiss.Index,
        doc_ids: tuple[str, ...],
        fingerprint: str,
        index_type: str,
        dtype: str,
        metadata: Mapping[str, Any] | None,
        nprobe: int | None = None,
    ) -> DenseIndex:
        obj = cls.__new__(cls)
        obj._attach(index, doc_ids, fingerprint, index_type, dtype, metadata, nprobe)
        return obj


# --------------------------------------------------------------------------------------------------
# internals


# The FAISS class of each (index type, dtype); the float16 ones use the fp16 scalar quantizer.
_INDEX_CLASSES = {
    ("flat", "float32"): faiss.IndexFlatIP,
    ("hnsw", "float32"): faiss.IndexHNSWFlat,
    ("ivf", "float32"): faiss.IndexIVFFlat,
    ("flat", "float16"): faiss.IndexScalarQuantizer,
    ("hnsw", "float16"): faiss.IndexHNSWSQ,
    ("ivf", "float16"): faiss.IndexIVFScalarQuantizer,
}


def _build_faiss_index(
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
        _check_positive(nlist, "nlist")
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
        for start in range(0, len(chunk), _ADD_CHUNK):
            rows = np.ascontiguousarray(chunk[start : start + _ADD_CHUNK], dtype=np.float32)
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


def _is_faiss_index_of(index: faiss.Index, index_type: str, dtype: str) -> bool:
    """Whether ``index`` is the inner-product FAISS index that ``index_type`` and ``dtype`` build."""
    if not isinstance(index, _INDEX_CLASSES[index_type, dtype]):
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


def _flat_vectors(index: faiss.Index) -> np.ndarray:
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


def _exact_top_k(queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k inner products: ``(scores, rows)``, each ``(n_queries, k)``, best first.

    Why not ``IndexFlatIP.search``: faiss-cpu 1.15 scans the corpus once per query, without BLAS,
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
        scores = queries @ np.asarray(vectors[start : start + block], dtype=np.float32).T
        rows = np.broadcast_to(np.arange(start, start + scores.shape[1]), scores.shape)
        top = _select_top_k(scores, rows, k)
        if best is not None:
            top = _select_top_k(np.hstack([best[0], top[0]]), np.hstack([best[1], top[1]]), k)
        best = top
    assert best is not None  # callers never pass an empty corpus
    return best


def _select_top_k(scores: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
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


def _as_matrix(array: np.ndarray, name: str) -> np.ndarray:
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


def file_checksum(path: Path) -> dict[str, Any]:
    """Size, SHA-256 and SHA-256 of a sample (see :func:`_sample_digest`) of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    size = path.stat().st_size
    return {"size": size, "sha256": digest.hexdigest(), "sample_sha256": _sample_digest(path, size)}


def _sample_digest(path: Path, size: int) -> str:
    """SHA-256 of ``_SAMPLE_BLOCKS`` blocks spread evenly over the file (first and last included)."""
    digest = hashlib.sha256()
    last = max(size - _SAMPLE_BYTES, 0)
    with open(path, "rb") as handle:
        for number in range(_SAMPLE_BLOCKS):
            handle.seek(last * number // (_SAMPLE_BLOCKS - 1))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def verify_checksum(directory: str | os.PathLike, meta: Mapping[str, Any], full: bool = False) -> None:
    """Check the index files against ``meta``'s checksum: sizes and samples, or (``full``) everything.

    Raises:
        UsageError: a file differs from what was saved (damaged or replaced), naming it.
    """
    for name, expected in (meta.get("checksum") or {}).items():
        path = Path(directory) / name
        if not path.is_file():
            continue  # the loader names missing files itself
        size = path.stat().st_size
        if size != expected["size"]:
            problem = f"has {size} bytes, {META_FILE} says {expected['size']}"
        elif full and file_checksum(path)["sha256"] != expected["sha256"]:
            problem = "does not match the SHA-256 in " + META_FILE
        elif not full and _sample_digest(path, size) != expected["sample_sha256"]:
            problem = "does not match the sample checksum in " + META_FILE
        else:
            continue
        raise UsageError(
            f"{path} is corrupt or changed since the index was saved (it {problem}); rebuild the index "
            "with `sbmoe index ...`"
        )


def _check_positive(value: int, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{name} must be a positive integer, got {value!r}")


def _read_json_file(path: Path) -> Any:
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; rebuild the index with `sbmoe index ...`")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is corrupt: not valid JSON ({error})") from None
