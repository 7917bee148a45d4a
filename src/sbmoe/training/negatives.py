"""Hard negatives: highly ranked documents that are not judged relevant, mined with BM25 or a dense model.

A negative is never a document judged relevant (score > 0) to that query in any split the caller
passes. Mined negatives are a plain ``dict[str, list[str]]`` (query id -> doc ids, best first), saved
as JSON beside the training run.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sbmoe.core.errors import UsageError
from sbmoe.core.io import read_json, write_json
from sbmoe.data.beir import BeirCollection

if TYPE_CHECKING:
    from sbmoe.config.jobs import EncodeConfig, JobOptions
    from sbmoe.model.retriever import Retriever

Negatives = dict[str, list[str]]


@dataclass(frozen=True)
class Mining:
    """How many negatives each query gets, and from how deep a ranking.

    Attributes:
        per_query: Negatives kept per query.
        depth: How deep to retrieve before filtering.
        skip_top: Drop this many top non-relevant documents first (they are often unjudged positives).
    """

    per_query: int = 10
    depth: int = 100
    skip_top: int = 0


def _filter(
    ranked: Mapping[str, Sequence[str]], relevant: Mapping[str, Mapping[str, int]], mining: Mining
) -> Negatives:
    negatives = {}
    for query_id, doc_ids in ranked.items():
        judged = {d for d, score in relevant.get(query_id, {}).items() if score > 0}
        kept = [d for d in doc_ids if d not in judged and d != query_id][mining.skip_top :]
        negatives[query_id] = kept[: mining.per_query]
    return negatives


def mine_bm25_negatives(
    collection: BeirCollection,
    qrels: Mapping[str, Mapping[str, int]],
    mining: Mining | None = None,
    show_progress: bool = False,
) -> Negatives:
    """BM25 (bm25s, English stop words, Snowball stemming when PyStemmer is installed) negatives.

    Args:
        collection: Corpus and queries.
        qrels: The queries to mine for, with their judgements (relevant documents are excluded).
        mining: How many negatives per query, from how deep (default: :class:`Mining`'s).
        show_progress: Show progress bars.
    """
    mining = mining or Mining()
    try:
        import bm25s
    except ImportError as error:  # pragma: no cover - depends on the installation
        raise ImportError("BM25 mining needs bm25s: pip install 'sbmoe[negatives]'") from error
    try:
        import Stemmer

        stemmer = Stemmer.Stemmer("english").stemWords
    except ImportError:  # pragma: no cover - optional
        stemmer = None
    doc_ids = list(collection.corpus)
    corpus_tokens = bm25s.tokenize(
        [collection.corpus[d].full_text for d in doc_ids],
        stopwords="en",
        stemmer=stemmer,
        show_progress=False,
    )
    index = bm25s.BM25()
    index.index(corpus_tokens, show_progress=show_progress)
    query_ids = [q for q in qrels if q in collection.queries]
    query_tokens = bm25s.tokenize(
        [collection.queries[q] for q in query_ids], stopwords="en", stemmer=stemmer, show_progress=False
    )
    depth = min(mining.depth, len(doc_ids))
    positions, _ = index.retrieve(query_tokens, k=depth, show_progress=show_progress)
    ranked = {q: [doc_ids[i] for i in row] for q, row in zip(query_ids, np.asarray(positions), strict=True)}
    return _filter(ranked, qrels, mining)


def mine_dense_negatives(
    retriever: Retriever,
    collection: BeirCollection,
    qrels: Mapping[str, Mapping[str, int]],
    mining: Mining | None = None,
    encode: EncodeConfig | None = None,
    options: JobOptions | None = None,
) -> Negatives:
    """Negatives from a dense retriever's exact top-``mining.depth`` (e.g. the zero-shot backbone).

    Args:
        retriever: The model that ranks the corpus.
        collection: Corpus and queries.
        qrels: The queries to mine for, with their judgements (relevant documents are excluded).
        mining: How many negatives per query, from how deep (default: :class:`Mining`'s).
        encode: How ``retriever`` encodes.
        options: Progress bars and the pooled-embedding cache (default: neither).
    """
    from sbmoe.config.jobs import JobOptions, SearchConfig
    from sbmoe.retrieval.indexing import build_index
    from sbmoe.retrieval.search import search

    mining = mining or Mining()
    options = options or JobOptions(show_progress=False)
    show_progress, cache = options.show_progress, options.cache
    documents = {doc_id: doc.full_text for doc_id, doc in collection.corpus.items()}
    index = build_index(retriever, documents, encode=encode, show_progress=show_progress, cache=cache)
    queries = {q: collection.queries[q] for q in qrels if q in collection.queries}
    quiet = JobOptions(show_progress=False, cache=cache)
    run = search(retriever, index, queries, SearchConfig(top_k=mining.depth), encode, quiet)
    ranked = {q: sorted(docs, key=lambda d: -docs[d]) for q, docs in run.items()}
    return _filter(ranked, qrels, mining)


def save_negatives(negatives: Negatives, path: str | Path) -> None:
    """Write mined negatives as JSON, atomically."""
    write_json(path, negatives)


def load_negatives(path: str | Path) -> Negatives:
    """Read negatives written by :func:`save_negatives`."""
    data = read_json(path)
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise UsageError(f"{path}: expected a JSON object of query id -> list of document ids")
    return {str(k): [str(d) for d in v] for k, v in data.items()}
