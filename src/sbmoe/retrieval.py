"""Index a corpus with a retriever and search it: texts in, ranx-style runs out."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sbmoe.cache import EmbeddingCache
from sbmoe.encoding import apply_head_stages, encode_texts
from sbmoe.errors import UsageError
from sbmoe.index import DenseIndex
from sbmoe.modeling import Retriever
from sbmoe.shards import ShardedIndex

Run = dict[str, dict[str, float]]


def build_index(
    retriever: Retriever,
    doc_ids: Sequence[str],
    documents: Sequence[str],
    batch_size: int = 64,
    precision: str = "auto",
    index_type: str = "flat",
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    dtype: str = "float32",
) -> DenseIndex:
    """Encode ``documents`` and put them in a FAISS inner-product index tagged with the model.

    ``index_type`` is ``flat`` (exact), ``hnsw`` or ``ivf``; ``nlist`` / ``nprobe`` set the IVF cells
    and the cells searched per query; ``dtype`` (``float32`` or ``float16``) is how the index stores
    the embeddings (see :class:`~sbmoe.index.DenseIndex`).
    """
    embeddings = encode_texts(
        retriever, documents, "document", batch_size, precision, show_progress=show_progress, cache=cache
    )
    return DenseIndex(
        embeddings,
        list(doc_ids),
        retriever.fingerprint(),
        index_type=index_type,
        nlist=nlist,
        nprobe=nprobe,
        dtype=dtype,
    )


def search(
    retriever: Retriever,
    index: DenseIndex | ShardedIndex,
    query_ids: Sequence[str],
    queries: Sequence[str],
    top_k: int = 100,
    exclude_self: bool = False,
    batch_size: int = 64,
    precision: str = "auto",
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
) -> Run:
    """Encode ``queries`` and return their top-``top_k`` documents from ``index``.

    The caller makes sure ``index`` was built by ``retriever`` (``DenseIndex.load`` and
    ``ShardedIndex.load`` check the fingerprint of a saved index). A sharded index is searched shard
    by shard.
    """
    embeddings = encode_texts(
        retriever, queries, "query", batch_size, precision, show_progress=show_progress, cache=cache
    )
    return index.search(embeddings, top_k, query_ids=list(query_ids), exclude_self=exclude_self)


def search_texts(
    retriever: Retriever,
    query_ids: Sequence[str],
    queries: Sequence[str],
    doc_ids: Sequence[str],
    documents: Sequence[str],
    top_k: int = 100,
    batch_size: int = 64,
    precision: str = "auto",
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
) -> Run:
    """Exact search of ``queries`` over ``documents`` without keeping an index."""
    index = build_index(
        retriever, doc_ids, documents, batch_size, precision, show_progress=show_progress, cache=cache
    )
    return search(
        retriever, index, query_ids, queries, top_k, batch_size=batch_size, precision=precision, cache=cache
    )


def search_per_expert_pooling(
    retriever: Retriever,
    query_ids: Sequence[str],
    queries: Sequence[str],
    doc_ids: Sequence[str],
    documents: Sequence[str],
    expert_poolings: Sequence[str],
    top_k: int = 100,
    exclude_self: bool = False,
    batch_size: int = 64,
    precision: str = "auto",
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
) -> dict[str, Run]:
    """Runs for several inference rules of one MoE model, encoding the texts once.

    The backbone runs once per text; each rule (``top1``, ``all``, ...) then only re-applies the
    small head to the pooled embeddings.
    """
    if retriever.head is None:
        raise UsageError("search_per_expert_pooling needs a model with an MoE head")
    pooled_docs = encode_texts(
        retriever, documents, "document", batch_size, precision, True, show_progress, cache=cache
    )
    pooled_queries = encode_texts(retriever, queries, "query", batch_size, precision, True, cache=cache)
    runs = {}
    for rule in expert_poolings:
        doc_embeddings = apply_head_stages(retriever, pooled_docs, rule)
        query_embeddings = apply_head_stages(retriever, pooled_queries, rule)
        index = DenseIndex(doc_embeddings, list(doc_ids), fingerprint=f"{rule}")
        runs[rule] = index.search(
            np.ascontiguousarray(query_embeddings),
            top_k,
            query_ids=list(query_ids),
            exclude_self=exclude_self,
        )
    return runs
