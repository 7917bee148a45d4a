"""The search jobs: queries over an index (in memory or saved, single or sharded), or over texts without
keeping an index, for one or several inference rules of an MoE model from one encoding pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sbmoe.config.jobs import EncodeConfig, SearchConfig
from sbmoe.core.errors import UsageError
from sbmoe.core.runs import Run
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import apply_head_stages, encode_texts, expert_pooling
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.interface import open_index
from sbmoe.retrieval.sharded.index import ShardedIndex


def search(
    retriever: Retriever,
    index: DenseIndex | ShardedIndex | str | os.PathLike,
    queries: Mapping[str, str],
    config: SearchConfig | None = None,
    encode: EncodeConfig | None = None,
    *,
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
    verify: bool = False,
) -> Run:
    """Encode ``queries`` (query id -> text) and return their top documents from ``index``.

    ``index`` is an index in memory or the directory of a saved one, single or sharded (searched
    shard by shard), or a store's URI (``milvus:...``, :mod:`sbmoe.retrieval.interface`). A saved
    index built by another model is refused (:class:`~sbmoe.retrieval.faiss.files.IndexMismatchError`);
    for one in memory that is the caller's job. A saved index is checked against its checksum: its
    size and a sample, or in full with ``verify``.
    """
    config = config or SearchConfig()
    if isinstance(index, (str, os.PathLike)):
        index = open_index(index, expected_fingerprint=retriever.index_fingerprints(), verify=verify)
    embeddings = encode_texts(
        retriever, list(queries.values()), "query", encode, show_progress=show_progress, cache=cache
    )
    return index.search(embeddings, config.top_k, query_ids=list(queries), exclude_self=config.exclude_self)


def search_documents(
    retriever: Retriever,
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    config: SearchConfig | None = None,
    encode: EncodeConfig | None = None,
    *,
    expert_poolings: Sequence[str] = (),
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
) -> dict[str, Run]:
    """Exact search of ``queries`` over ``documents`` (id -> text each) without keeping an index.

    The backbone encodes every text once; each inference rule in ``expert_poolings`` (``top1``,
    ``all``, ...) then only re-applies the small head to the pooled embeddings.

    Returns:
        One run per rule, keyed by rule; without ``expert_poolings``, one run under the model's own
        rule (``model`` for a model without an MoE head).

    Raises:
        UsageError: ``expert_poolings`` for a model without an MoE head.
    """
    config = config or SearchConfig()
    if expert_poolings and retriever.head is None:
        raise UsageError("expert_poolings need a model with an MoE head")
    # The backbone's part once, for every rule (and from the cache when it holds these texts).
    pooled = {
        kind: encode_texts(
            retriever, list(texts.values()), kind, encode, pooled_only=True, show_progress=bar, cache=cache
        )
        for kind, texts, bar in (("document", documents, show_progress), ("query", queries, False))
    }
    return search_pooled(
        retriever,
        (list(queries), pooled["query"]),
        (list(documents), pooled["document"]),
        config,
        expert_poolings=expert_poolings,
    )


def search_pooled(
    retriever: Retriever,
    queries: tuple[Sequence[str], np.ndarray],
    documents: tuple[Sequence[str], np.ndarray],
    config: SearchConfig | None = None,
    *,
    expert_poolings: Sequence[str] = (),
) -> dict[str, Run]:
    """Exact search of pooled backbone embeddings (``(ids, array)`` each): only the head runs.

    Returns runs as :func:`search_documents` does.
    """
    config = config or SearchConfig()
    (query_ids, query_pooled), (doc_ids, doc_pooled) = queries, documents
    runs = {}
    for rule in expert_poolings or [None]:
        with expert_pooling(retriever, rule):
            name = retriever.head.expert_pooling if retriever.head is not None else "model"
            index = DenseIndex(
                apply_head_stages(retriever, doc_pooled, "document"), list(doc_ids), retriever.fingerprint()
            )
            runs[name] = index.search(
                apply_head_stages(retriever, query_pooled, "query"),
                config.top_k,
                query_ids=list(query_ids),
                exclude_self=config.exclude_self,
            )
    return runs


def describe_run(run: Run, limit: int) -> list[dict[str, Any]]:
    """Flatten a run into rows (query, rank, doc, score) for printing."""
    rows = []
    for query_id, scores in run.items():
        ranked = sorted(scores.items(), key=lambda item: (-item[1], item[0]))[:limit]
        rows.extend(
            {"query_id": query_id, "rank": rank, "doc_id": doc_id, "score": score}
            for rank, (doc_id, score) in enumerate(ranked, start=1)
        )
    return rows
