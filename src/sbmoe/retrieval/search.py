"""The search jobs: queries over an index (any :class:`~sbmoe.retrieval.interface.Index`), or over
texts without keeping an index, for one or several inference rules of an MoE model from one encoding pass.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from sbmoe.config.jobs import EncodeConfig, JobOptions, SearchConfig
from sbmoe.core.errors import UsageError
from sbmoe.core.runs import Run
from sbmoe.inference.encoding import apply_head_stages, encode_pooled, encode_texts, expert_pooling
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.interface import Index

# A library call shows no progress bars unless asked (the command line asks).
QUIET = JobOptions(show_progress=False)


def search(
    retriever: Retriever,
    index: Index,
    queries: Mapping[str, str],
    config: SearchConfig | None = None,
    encode: EncodeConfig | None = None,
    options: JobOptions | None = None,
) -> Run:
    """Encode ``queries`` (query id -> text) and return their top documents from ``index``.

    Open a saved index with :func:`~sbmoe.retrieval.interface.open_index` and the model's
    :meth:`~sbmoe.model.retriever.Retriever.index_fingerprints`, so that one built by another model
    is refused; for an index built in memory that is the caller's job.

    Args:
        options: Progress bars and the embedding cache (default :data:`QUIET`: no bars, no cache).

    Raises:
        UsageError: ``config.expert_poolings`` (the index holds its documents under one rule).
    """
    config = config or SearchConfig()
    options = options or QUIET
    if config.expert_poolings:
        raise UsageError(
            "an index holds its documents under the rule it was built with: expert_poolings apply to "
            "search_documents (exact search over texts)"
        )
    embeddings = encode_texts(retriever, list(queries.values()), "query", encode, options=options)
    return index.search(embeddings, config.top_k, query_ids=list(queries), exclude_self=config.exclude_self)


def search_documents(
    retriever: Retriever,
    queries: Mapping[str, str],
    documents: Mapping[str, str],
    config: SearchConfig | None = None,
    encode: EncodeConfig | None = None,
    options: JobOptions | None = None,
) -> dict[str, Run]:
    """Exact search of ``queries`` over ``documents`` (id -> text each) without keeping an index.

    The backbone encodes every text once; each inference rule in ``config.expert_poolings``
    (``top1``, ``all``, ...) then only re-applies the small head to the pooled embeddings.

    Args:
        options: Progress bars (the documents') and the embedding cache (default :data:`QUIET`).

    Returns:
        One run per rule, keyed by rule; without ``expert_poolings``, one run under the model's own
        rule (``model`` for a model without an MoE head).

    Raises:
        UsageError: ``expert_poolings`` for a model without an MoE head.
    """
    config = config or SearchConfig()
    options = options or QUIET
    if config.expert_poolings and retriever.head is None:
        raise UsageError("expert_poolings need a model with an MoE head")
    # The backbone's part once, for every rule (and from the cache when it holds these texts).
    pooled = {
        kind: encode_pooled(
            retriever,
            list(texts.values()),
            kind,
            encode,
            options=JobOptions(show_progress=bar, cache=options.cache),
        )
        for kind, texts, bar in (("document", documents, options.show_progress), ("query", queries, False))
    }
    return search_pooled(
        retriever, (list(queries), pooled["query"]), (list(documents), pooled["document"]), config
    )


def search_pooled(
    retriever: Retriever,
    queries: tuple[Sequence[str], np.ndarray],
    documents: tuple[Sequence[str], np.ndarray],
    config: SearchConfig | None = None,
) -> dict[str, Run]:
    """Exact search of pooled backbone embeddings (``(ids, array)`` each): only the head runs.

    Returns runs as :func:`search_documents` does (one per rule of ``config.expert_poolings``).
    """
    config = config or SearchConfig()
    (query_ids, query_pooled), (doc_ids, doc_pooled) = queries, documents
    runs = {}
    for rule in config.expert_poolings or [None]:
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
