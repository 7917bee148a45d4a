"""A FAISS index of document embeddings: build, batched top-k search, atomic save and checked load.

An index directory holds ``index.faiss`` (the FAISS index, readable by any FAISS tool, loaded
memory-mapped), ``doc_ids.json`` and ``meta.json`` (the model's fingerprint, settings, versions and
a checksum of the other two files); :mod:`sbmoe.retrieval.faiss.files` reads and checks them, and
defines the layout of sharded indexes, which :mod:`sbmoe.retrieval.sharded.index` searches and merges.

Index types: ``flat`` (exact, the default; searched by :mod:`sbmoe.retrieval.faiss.exact_search`),
``hnsw`` (graph) and ``ivf`` (inverted lists over k-means cells), the last two approximate and
faster on large corpora (built by :mod:`sbmoe.retrieval.faiss.index_types`). Each stores the embeddings
as ``float32`` (the default) or ``float16`` (FAISS's fp16 scalar quantizer: half the memory and
disk, scores of unit vectors move by less than 5e-4). Scores are inner products of the vectors as
given; normalising them (cosine similarity) is the encoder's job.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from sbmoe import __version__
from sbmoe.config.jobs import IndexConfig
from sbmoe.core.artifacts import INDEX, owns
from sbmoe.core.errors import MissingInputError, UsageError
from sbmoe.core.io import atomic_directory, write_json
from sbmoe.core.layouts import INDEX_FILES
from sbmoe.core.runs import Run
from sbmoe.retrieval.faiss.exact_search import as_matrix, exact_top_k
from sbmoe.retrieval.faiss.files import (
    FORMAT_VERSION,
    check_fingerprint,
    check_ids,
    file_checksum,
    is_sharded_index,
    read_doc_ids,
    read_meta,
    shard_directory,
    verify_checksum,
)
from sbmoe.retrieval.faiss.index_types import (
    ADD_CHUNK,
    build_faiss_index,
    check_positive,
    default_nprobe,
    flat_vectors,
    read_faiss_index,
)
from sbmoe.retrieval.faiss.index_types import default_nlist as default_nlist

# FAISS searches HNSW graphs with efSearch=16 by default, too narrow for top-100 retrieval.
_HNSW_EF_SEARCH = 128


# Its size (~400 lines, most of them docstrings and argument checks) is earned: an index is built,
# saved, loaded (memory-mapped, checksummed) and searched as one object; FAISS builds, file checks and
# the exact scan live in index_types, files and exact_search.
class DenseIndex:
    """Document embeddings in a FAISS inner-product index, searched in batches.

    Args:
        embeddings: ``(n_docs, dim)`` array; converted to float32.
        doc_ids: one unique id per row of ``embeddings``.
        fingerprint: identifies the model that produced the embeddings; :meth:`load` checks it.
        config: The index to build (default: exact, float32):

            * ``index_type``: ``"flat"`` (``faiss.IndexFlatIP``, exact; the default), ``"hnsw"``
              (``faiss.IndexHNSWFlat`` with M=32) or ``"ivf"`` (``faiss.IndexIVFFlat``: k-means
              cells, ``nprobe`` of them searched); the last two are approximate and faster on
              large corpora.
            * ``embedding_dtype``: how the index stores the embeddings: ``"float32"`` (the
              default) or ``"float16"`` (half the memory and disk; ``faiss.IndexScalarQuantizer``,
              ``faiss.IndexHNSWSQ`` or ``faiss.IndexIVFScalarQuantizer`` with ``QT_fp16``).
              Queries and scores stay float32; rounding unit-length embeddings to float16 moves
              their scores by less than 2^-11 (about 5e-4). Exact search converts the vectors to
              float32 a block at a time for each batch of queries: as fast as float32 for batches
              of hundreds of queries, several times slower one query at a time (300k x 384:
              1.05 s vs 0.13 s on 2 cores).
            * ``nlist``: IVF only: number of cells (default :func:`default_nlist`).
            * ``nprobe``: IVF only: cells searched per query (default :func:`default_nprobe`);
              saved with the index and changeable later through :attr:`nprobe`.
        metadata: JSON-serialisable extras stored in ``meta.json`` (dataset, encoder settings, ...).

    Attributes:
        index_type: The index type built (``flat``, ``hnsw`` or ``ivf``).
        dtype: How the embeddings are stored (``float32`` or ``float16``).
        location: The directory it was loaded from (``None``: built in memory).

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
        config: IndexConfig | None = None,
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        vectors = as_matrix(embeddings, "embeddings")
        if vectors.shape[0] == 0:
            raise UsageError("embeddings has no rows: there is nothing to index")
        ids = check_ids(doc_ids, "doc_ids")
        if len(ids) != vectors.shape[0]:
            raise UsageError(
                f"got {len(ids)} doc_ids for {vectors.shape[0]} embedding rows; they must match one to one"
            )
        config = config or IndexConfig()
        index_type, dtype = _kind(config)
        index = build_faiss_index(
            index_type, dtype, vectors.shape[1], len(ids), lambda: iter([vectors]), config.nlist
        )
        self._attach(index, ids, fingerprint, index_type, dtype, metadata, config.nprobe)

    @classmethod
    def from_chunks(
        cls,
        chunks: Callable[[], Iterator[np.ndarray]],
        doc_ids: Sequence[str],
        fingerprint: str,
        dim: int,
        config: IndexConfig | None = None,
        metadata: Mapping[str, Any] | None = None,
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
        config = config or IndexConfig()
        index_type, dtype = _kind(config)
        index = build_faiss_index(index_type, dtype, dim, len(ids), chunks, config.nlist)
        return cls._from_faiss(index, ids, fingerprint, index_type, dtype, metadata, config.nprobe)

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
        self.location: str | None = None  # set by load
        self._vectors: np.ndarray | None = None
        self._nprobe: int | None = None
        if index_type == "flat":
            # A zero-copy view of the vectors inside the FAISS index (float16 ones too), for
            # exact_top_k.
            self._vectors = flat_vectors(index)
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
        check_positive(value, "nprobe")
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
        view = flat_vectors(self._index)[start:stop]
        if view.dtype != np.float32:
            return view.astype(np.float32)
        view.flags.writeable = False
        return view

    def iter_vectors(self, rows: int = ADD_CHUNK) -> Iterator[np.ndarray]:
        """The stored embeddings as float32 arrays of ``rows`` rows, in row order (see :meth:`vectors`).

        Bounds the memory of the float32 copies that float16 and ``ivf`` indexes hand out.
        """
        check_positive(rows, "rows")
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
        queries = as_matrix(query_embeddings, "query_embeddings")
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
        check_positive(k, "k")
        check_positive(batch_size, "batch_size")

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
            return exact_top_k(queries, self._vectors, k)
        if self.index_type == "ivf":
            return self._index.search(queries, k, params=faiss.SearchParametersIVF(nprobe=self._nprobe))
        params = faiss.SearchParametersHNSW(efSearch=max(_HNSW_EF_SEARCH, k))
        return self._index.search(queries, k, params=params)

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the index to ``directory`` atomically.

        The files are written to a temporary directory that replaces ``directory`` only once all of
        them are complete, so an interrupted save leaves any earlier index there intact; entries
        there that are not an index's own (a user's notes) are kept.

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
        # A user's files in an earlier index's folder stay; only the index's own are replaced.
        with atomic_directory(directory, keep=lambda entry: not owns(INDEX, entry)) as tmp:
            faiss.write_index(self._index, str(tmp / INDEX_FILES.index))
            write_json(tmp / INDEX_FILES.doc_ids, list(self._doc_ids))
            meta["checksum"] = {
                name: file_checksum(tmp / name) for name in (INDEX_FILES.index, INDEX_FILES.doc_ids)
            }
            write_json(tmp / INDEX_FILES.meta, meta)
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
                holds a sharded index (use :func:`sbmoe.retrieval.open_index` or
                :class:`sbmoe.retrieval.sharded.index.ShardedIndex`).
        """
        directory = Path(directory)
        if not directory.is_dir():
            raise MissingInputError(f"no index directory at {directory}; build one with `sbmoe index ...`")
        if is_sharded_index(directory):
            raise UsageError(
                f"{directory} holds a sharded index: search it with sbmoe.retrieval.open_index (or "
                f"ShardedIndex.load), or merge it into one with `sbmoe merge-index --index {directory} ...`"
            )

        meta_path = directory / INDEX_FILES.meta
        meta = read_meta(directory)
        dtype = meta["dtype"]
        # Checked before reading the (possibly large) index file.
        check_fingerprint(directory, meta, expected_fingerprint)
        verify_checksum(directory, meta, full=verify)
        doc_ids = read_doc_ids(directory)

        index = read_faiss_index(directory / INDEX_FILES.index, meta_path, meta["index_type"], dtype, mmap)
        if not (index.ntotal == len(doc_ids) == meta["count"]) or index.d != meta["dim"]:
            raise UsageError(
                f"index directory {directory} is inconsistent: {INDEX_FILES.index} has {index.ntotal} "
                f"vectors of dimension {index.d}, {INDEX_FILES.doc_ids} has {len(doc_ids)} ids, "
                f"{INDEX_FILES.meta} says {meta['count']} of dimension {meta['dim']}"
            )

        loaded = cls._from_faiss(
            index,
            doc_ids,
            meta["fingerprint"],
            meta["index_type"],
            dtype,
            meta.get("metadata"),
            meta.get("nprobe"),
        )
        loaded.location = str(directory)
        return loaded

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
        if (root / INDEX_FILES.meta).exists():
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


def _kind(config: IndexConfig) -> tuple[str, str]:
    """``config``'s index type and embedding dtype, their defaults (exact, float32) filled in."""
    return config.index_type or "flat", config.embedding_dtype or "float32"
