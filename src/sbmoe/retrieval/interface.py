"""What every consumer of an index takes (:class:`Index`) and the one place that opens one.

Three implementations satisfy :class:`Index`: a FAISS directory
(:class:`~sbmoe.retrieval.faiss.index.DenseIndex`), a directory of FAISS shards
(:class:`~sbmoe.retrieval.sharded.index.ShardedIndex`) and a Milvus collection named by a
``milvus:`` URI (:class:`~sbmoe.retrieval.milvus.store.MilvusStore`, :mod:`sbmoe.retrieval.milvus`).
Search, evaluation and serving take the object; only :func:`open_index` looks at the path or URI.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from sbmoe.core.runs import Run
from sbmoe.retrieval.milvus.uri import is_store_uri

__all__ = ["Index", "open_index"]


@runtime_checkable
class Index(Protocol):
    """Document embeddings searched by inner product: what search, evaluation and serving need of one.

    Attributes:
        fingerprint: The fingerprint of the model that made the document embeddings.
        index_type: ``flat`` (exact), ``hnsw`` or ``ivf`` (``mixed``: shards of several types).
        dtype: How the embeddings are stored, ``float32`` or ``float16`` (``mixed``: shards of both).
        metadata: What the index records of how it was made (collection, configs, provenance).
        location: The directory or URI it was opened from (``None``: built in memory).
    """

    fingerprint: str
    index_type: str
    dtype: str
    metadata: dict[str, Any]
    location: str | None

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        ...

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """Every document id held."""
        ...

    def __len__(self) -> int: ...

    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        query_ids: Sequence[str] | None = None,
        exclude_self: bool = False,
        batch_size: int = 1024,
    ) -> Run:
        """Top-``k`` documents of every query; see :meth:`sbmoe.retrieval.faiss.index.DenseIndex.search`."""
        ...


def open_index(
    location: str | os.PathLike,
    expected_fingerprint: str | Sequence[str] | None = None,
    *,
    verify: bool = False,
) -> Index:
    """Open the index at ``location``: a FAISS directory, a sharded one, or a store URI (``milvus:...``).

    Args:
        location: An index directory from ``sbmoe index`` (sharded or not) or a store URI from
            ``sbmoe index --store``.
        expected_fingerprint: The fingerprint of the model that will encode the queries, or all
            those it accepts (:meth:`~sbmoe.model.retriever.Retriever.index_fingerprints`); ``None``
            skips the check.
        verify: Check every file of a FAISS index in full against its checksum (otherwise its sizes
            and a sample); a store is always checked to hold its whole corpus.

    Raises:
        IndexMismatchError: the index was built by another model.
        UsageError: nothing usable at ``location`` (missing, corrupt, unfinished, or the ``store``
            extra is not installed); one line naming it.
    """
    # Imported here: each implementation pulls in its engine (FAISS, pymilvus) only when opened.
    if is_store_uri(location):
        from sbmoe.retrieval.milvus.store import MilvusStore
        from sbmoe.retrieval.milvus.uri import parse_store_uri

        return MilvusStore.open(parse_store_uri(str(location)), expected_fingerprint)
    from sbmoe.retrieval.faiss.files import is_sharded_index

    if is_sharded_index(location):
        from sbmoe.retrieval.sharded.index import ShardedIndex

        return ShardedIndex.load(location, expected_fingerprint, verify)
    from sbmoe.retrieval.faiss.index import DenseIndex

    return DenseIndex.load(location, expected_fingerprint, verify=verify)
