"""A Milvus collection searched as an index and written by document id.

The collection's layout is :mod:`sbmoe.retrieval.milvus.collection`'s. Writes are keyed by
``doc_id`` (new ids inserted, stored ones upserted): a document written twice is stored once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np

from sbmoe import __version__
from sbmoe.core.errors import MissingInputError, UsageError
from sbmoe.core.runs import Run
from sbmoe.retrieval.faiss.files import IndexMismatchError, check_fingerprint, check_ids
from sbmoe.retrieval.milvus.collection import (
    EXPERT_FIELD,
    FORMAT_VERSION,
    GATE_FIELD,
    HNSW_EF_SEARCH,
    ID_FIELD,
    SETTINGS,
    VECTOR_FIELD,
    BoundedClient,
    StoreServerError,
    connect,
    create_collection,
    finish_writing,
    load_collection,
    pymilvus_module,
    read_meta,
    release,
    server_errors,
    server_timestamp,
)
from sbmoe.retrieval.milvus.uri import StoreURI

# Milvus answers at most 16384 hits per query.
MAX_TOP_K = 16384
# Ids looked up in one `doc_id in [...]` query (keeps each expression small).
_LOOKUP_BATCH = 1024


@contextlib.contextmanager
def _quiet_timestamp_fallback() -> Iterator[None]:
    """Silence pymilvus's warning on a query iterator's first call on Milvus Lite.

    pymilvus asks the server for a timestamp, which Milvus Lite does not implement (the server's
    traceback for it is dropped on connecting, :func:`~sbmoe.retrieval.milvus.collection.connect`),
    and warns that it uses its own clock, which is what Milvus Lite wants. Nothing is wrong.
    """
    logger = logging.getLogger("pymilvus")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _quoted(value: str) -> str:
    """``value`` as a string literal of Milvus's filter expressions."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


class MilvusStore:
    """A Milvus collection written by :func:`~sbmoe.retrieval.milvus.indexing.index_into_store`.

    Searched like :class:`~sbmoe.retrieval.faiss.index.DenseIndex` (same :meth:`search`); use
    :meth:`open` to search a finished store and :meth:`create_or_resume` to write one.

    Attributes:
        uri: Where the collection is.
        location: Its URI as given (:attr:`sbmoe.retrieval.interface.Index.location`).
        fingerprint: The fingerprint of the model that made the vectors.
        index_type: ``flat`` (Milvus FLAT, exact), ``hnsw`` or ``ivf`` (IVF_FLAT).
        dtype: ``float32``.
        metadata: The caller's metadata (collection, model and encode configs, provenance).
    """

    def __init__(self, uri: StoreURI, client: BoundedClient, meta: Mapping[str, Any]) -> None:
        self.uri = uri
        self.location: str | None = uri.text
        self._client = client
        self.meta = dict(meta)
        self.fingerprint: str = meta["fingerprint"]
        self.index_type: str = meta["index_type"]
        self.dtype = "float32"
        self.metadata: dict[str, Any] = dict(meta.get("metadata") or {})
        self._count: int | None = None
        # How searches see writes: Strong (wait for the server's next time tick) while writing;
        # a finished store opened for searching reads as of its opening (:meth:`open`).
        self._consistency: dict[str, Any] = {"consistency_level": "Strong"}

    # ------------------------------------------------------------------------------ opening
    @classmethod
    def open(cls, uri: StoreURI, expected_fingerprint: str | Sequence[str] | None = None) -> MilvusStore:
        """Open a finished collection for searching.

        Raises:
            MissingInputError: no such database file or collection.
            IndexMismatchError: the vectors were made by another model than ``expected_fingerprint``'s.
            UsageError: the collection was not written by sbmoe, or not all its documents are in yet.
        """
        client = connect(uri, create=False)
        if not client.has_collection(uri.collection):
            raise MissingInputError(
                f"{uri.text} has no collection {uri.collection!r}; build it with "
                f"`sbmoe index ... --store {uri.text}`"
            )
        store = cls(uri, client, read_meta(client, uri))
        check_fingerprint(uri.text, store.meta, expected_fingerprint)
        if len(store) != store.meta["count"]:
            raise UsageError(
                f"{uri.text} holds {len(store)} of the corpus's {store.meta['count']} documents: indexing "
                f"has not finished; run `sbmoe index ... --store {uri.text}` again (with the missing "
                f"--shard I/N, if sharded) to complete it"
            )
        load_collection(client, uri)
        if not uri.is_embedded and (timestamp := server_timestamp(client)) is not None:
            store._consistency = {"consistency_level": "Customized", "guarantee_timestamp": timestamp}
        return store

    @classmethod
    def create_or_resume(cls, uri: StoreURI, meta: Mapping[str, Any], overwrite: bool = False) -> MilvusStore:
        """The collection to write ``meta``'s corpus into: a new one, or one an earlier run began.

        Args:
            uri: Where to write.
            meta: The collection's settings, from :func:`~sbmoe.retrieval.milvus.collection.store_meta`.
            overwrite: Drop a collection there written with other settings (another model, corpus
                or index type) instead of refusing it.

        Raises:
            IndexMismatchError: the collection holds another model's vectors (without ``overwrite``).
            UsageError: it holds other settings (without ``overwrite``), or was not written by sbmoe.
        """
        meta = {
            "format_version": FORMAT_VERSION,
            **meta,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "sbmoe_version": __version__,
            "pymilvus_version": pymilvus_module().__version__,
        }
        client = connect(uri, create=True)
        if client.has_collection(uri.collection) or not _created(client, uri, meta):
            found = read_meta(client, uri)
            different = [key for key in SETTINGS if found.get(key) != meta.get(key)]
            if not different:
                load_collection(client, uri)
                return cls(uri, client, found)
            if not overwrite:
                if "fingerprint" in different:
                    raise IndexMismatchError(uri.text, found["fingerprint"], meta["fingerprint"])
                shown = ", ".join(f"{key} {found.get(key)!r} -> {meta.get(key)!r}" for key in different)
                raise UsageError(
                    f"{uri.text} holds a collection written with other settings ({shown}); add --overwrite "
                    f"to replace it, or use another ?collection=NAME"
                )
            client.drop_collection(uri.collection)
            create_collection(client, uri, meta)
        load_collection(client, uri)
        return cls(uri, client, meta)

    def finish(self) -> None:
        """End a write job: on a server, seal the written rows and wait until they are indexed
        (:func:`~sbmoe.retrieval.milvus.collection.finish_writing`)."""
        finish_writing(self._client, self.uri, exact=self.index_type == "flat")

    def close(self) -> None:
        """Disconnect (and stop this process's embedded server of a Milvus Lite file)."""
        self._client.close()
        release(self.uri)

    def __enter__(self) -> MilvusStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ contents
    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.meta["dim"])

    @property
    def experts(self) -> int:
        """MoE experts whose routing each document carries (0: none)."""
        return int(self.meta.get("experts") or 0)

    def __len__(self) -> int:
        if self._count is None:
            rows = self._client.query(
                self.uri.collection, filter="", output_fields=["count(*)"], consistency_level="Strong"
            )
            self._count = int(rows[0]["count(*)"])
        return self._count

    def __repr__(self) -> str:
        return (
            f"MilvusStore({self.uri.text!r}, index_type={self.index_type!r}, count={len(self)}, "
            f"dim={self.dim}, fingerprint={self.fingerprint[:12]!r})"
        )

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """Every document id in the collection (in the engine's order, read page by page)."""
        return tuple(self.iter_doc_ids())

    def iter_doc_ids(self, page: int = 4096) -> Iterator[str]:
        """The document ids in the collection, ``page`` at a time."""
        with _quiet_timestamp_fallback():
            iterator = self._client.query_iterator(
                self.uri.collection, batch_size=page, output_fields=[ID_FIELD], filter=""
            )
        try:
            while True:
                with server_errors(self.uri, "query_iterator"):
                    rows = iterator.next()
                if not rows:
                    return
                yield from (row[ID_FIELD] for row in rows)
        finally:
            iterator.close()

    def existing_ids(self, doc_ids: Sequence[str]) -> set[str]:
        """Which of ``doc_ids`` the collection already holds."""
        found: set[str] = set()
        for start in range(0, len(doc_ids), _LOOKUP_BATCH):
            batch = doc_ids[start : start + _LOOKUP_BATCH]
            rows = self._client.query(
                self.uri.collection,
                filter=f"{ID_FIELD} in [{','.join(_quoted(d) for d in batch)}]",
                output_fields=[ID_FIELD],
                consistency_level="Strong",
            )
            found.update(row[ID_FIELD] for row in rows)
        return found

    def upsert(
        self,
        doc_ids: Sequence[str],
        embeddings: np.ndarray,
        experts: np.ndarray | None = None,
        gates: np.ndarray | None = None,
    ) -> None:
        """Write documents, replacing any already stored under the same id.

        On a server, ids the collection does not hold yet are inserted rather than upserted: an
        upsert writes a delete record for its id whether or not the id is there, and Milvus 2.3
        compacts a segment whose delete records pass a fifth of its rows, then indexes it again,
        so upserting a new corpus builds its index twice. (Two jobs writing the same documents at
        the same moment may therefore store one twice; shards write disjoint ones.)

        Args:
            doc_ids: One id per row.
            embeddings: ``(rows, dim)`` float32.
            experts: Models with an MoE head: each document's top-1 expert ``(rows,)``.
            gates: Models with an MoE head: each document's gate probabilities ``(rows, experts)``.
        """
        vectors = np.asarray(embeddings, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape != (len(doc_ids), self.dim):
            raise UsageError(
                f"expected {len(doc_ids)} embeddings of dimension {self.dim}, got {vectors.shape}"
            )
        if (experts is None) != (self.experts == 0) or (gates is None) != (self.experts == 0):
            raise UsageError(f"this store holds the routing of {self.experts} experts per document")
        rows = [{ID_FIELD: d, VECTOR_FIELD: vector} for d, vector in zip(doc_ids, vectors, strict=True)]
        if experts is not None and gates is not None:
            for row, expert, gate in zip(rows, experts.tolist(), gates.tolist(), strict=True):
                row[EXPERT_FIELD] = int(expert)
                row[GATE_FIELD] = gate
        present = set(doc_ids) if self.uri.is_embedded else self.existing_ids(doc_ids)
        new = [row for row in rows if row[ID_FIELD] not in present]
        if new:
            self._client.insert(self.uri.collection, new)
        if len(new) < len(rows):
            self._client.upsert(self.uri.collection, [row for row in rows if row[ID_FIELD] in present])
        self._count = None

    # ------------------------------------------------------------------------------ search
    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        query_ids: Sequence[str] | None = None,
        exclude_self: bool = False,
        batch_size: int = 1024,
    ) -> Run:
        """Return the top-``k`` documents of every query as a ranx-style run.

        The same call as :meth:`sbmoe.retrieval.faiss.index.DenseIndex.search`; a ``flat`` store ranks
        exactly (scores equal up to float rounding), ``hnsw`` and ``ivf`` approximately.

        Raises:
            UsageError: bad shapes, ids, ``k`` (also above Milvus's limit of 16384) or
                ``batch_size``, or ``exclude_self`` without ``query_ids``.
        """
        queries = _query_matrix(query_embeddings, self.dim)
        if query_ids is None:
            if exclude_self:
                raise UsageError("exclude_self needs query_ids to compare with the doc ids")
            qids = tuple(str(i) for i in range(len(queries)))
        else:
            qids = check_ids(query_ids, "query_ids")
            if len(qids) != len(queries):
                raise UsageError(f"got {len(qids)} query_ids for {len(queries)} query embeddings")
        for value, name in ((k, "k"), (batch_size, "batch_size")):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UsageError(f"{name} must be a positive integer, got {value!r}")
        k = min(int(k), len(self))
        fetch = min(k + 1, len(self)) if exclude_self else k
        if fetch > MAX_TOP_K:
            raise UsageError(f"Milvus returns at most {MAX_TOP_K} documents per query, {fetch} asked")
        run: Run = {}
        for start in range(0, len(queries), batch_size):
            hits = self._client.search(
                self.uri.collection,
                data=list(queries[start : start + batch_size]),
                limit=fetch,
                anns_field=VECTOR_FIELD,
                search_params=self._search_params(fetch),
                output_fields=[ID_FIELD],
                **self._consistency,
            )
            for qid, ranked in zip(qids[start : start + batch_size], hits, strict=True):
                pairs = [(hit[ID_FIELD], float(hit["distance"])) for hit in ranked]
                if exclude_self:
                    pairs = [pair for pair in pairs if pair[0] != qid][:k]
                run[qid] = dict(pairs)
        return run

    def _search_params(self, k: int) -> dict[str, Any]:
        params: dict[str, Any] = {}
        if self.index_type == "hnsw":
            params = {"ef": max(HNSW_EF_SEARCH, k)}
        elif self.index_type == "ivf":
            params = {"nprobe": int(self.meta["nprobe"])}
        return {"metric_type": "IP", "params": params}


def _created(client: BoundedClient, uri: StoreURI, meta: Mapping[str, Any]) -> bool:
    """Create the collection; ``False`` if another job (a shard of the same corpus, writing at the
    same time) created it between our look and our request."""
    try:
        create_collection(client, uri, meta)
    except StoreServerError:
        if not client.has_collection(uri.collection):
            raise
        return False
    return True


def _query_matrix(query_embeddings: np.ndarray, dim: int) -> np.ndarray:
    queries = np.asarray(query_embeddings)
    if queries.ndim != 2 or queries.shape[1] != dim:
        raise UsageError(
            f"query_embeddings must be a (queries, {dim}) array, got shape {queries.shape}; were they "
            f"made by the model that built the store?"
        )
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if not np.isfinite(queries).all():
        raise UsageError("query_embeddings hold NaN or infinite values")
    return queries
