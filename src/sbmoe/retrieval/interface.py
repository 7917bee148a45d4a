"""Vector stores: document embeddings kept in a vector database instead of FAISS files, named by a URI.

FAISS directories (:class:`~sbmoe.retrieval.faiss.index.DenseIndex`,
:class:`~sbmoe.retrieval.sharded.index.ShardedIndex`) stay the default and the embedded choice. A
*store* is a collection in a vector database that can shard and replicate across machines; sbmoe
searches it through the same call as a FAISS index
(:class:`VectorStore`), so ``sbmoe search``, ``sbmoe evaluate --index`` and ``sbmoe serve`` take its
URI wherever they take an index directory (:func:`~sbmoe.retrieval.sharded.index.load_index`).

The engine is Milvus (:mod:`sbmoe.retrieval.milvus.store`), installed with the ``store`` extra
(``pip install 'sbmoe[store]'``). URIs::

    milvus:PATH.db[?collection=NAME]            Milvus Lite, embedded, a local file (relative path)
    milvus:///ABSOLUTE/PATH.db[?collection=NAME] Milvus Lite at an absolute path
    milvus://HOST:PORT[/DATABASE][?collection=NAME&tls=1&shards=N&replicas=R]
                                                 a Milvus server or cluster (token: $MILVUS_TOKEN)

``collection`` defaults to ``sbmoe``; ``shards`` (a new collection's, default Milvus's own) and
``replicas`` (in-memory copies loaded for searching) apply to a server. The same code talks to both;
only the URI changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from sbmoe.core.runs import Run
from sbmoe.retrieval.milvus.uri import StoreURI, is_store_uri, parse_store_uri

if TYPE_CHECKING:
    from sbmoe.retrieval.milvus.store import MilvusStore

__all__ = ["StoreURI", "VectorStore", "is_store_uri", "open_store", "parse_store_uri"]


@runtime_checkable
class VectorStore(Protocol):
    """What search, evaluation and serving need of an index: FAISS directories and stores alike."""

    fingerprint: str
    index_type: str
    dtype: str
    metadata: dict[str, Any]

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


def open_store(uri: str | StoreURI, expected_fingerprint: str | Sequence[str] | None = None) -> MilvusStore:
    """Open a finished store for searching, refusing one built by another model.

    Args:
        uri: The store's URI.
        expected_fingerprint: The fingerprint of the model that will encode the queries, or all those
            it accepts (:func:`~sbmoe.retrieval.faiss.files.check_fingerprint`).

    Raises:
        IndexMismatchError: built by another model.
        UsageError: not found, unfinished, or the ``store`` extra is not installed.
    """
    from sbmoe.retrieval.milvus.store import MilvusStore

    parsed = uri if isinstance(uri, StoreURI) else parse_store_uri(uri)
    return MilvusStore.open(parsed, expected_fingerprint)
