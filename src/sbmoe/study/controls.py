"""Document-prior controls: how much of a gain is knowing which documents the training queries like?

A model trained on a collection's training queries can learn, besides better representations, that
some documents are relevant to many of them, and test queries of small collections often share
those documents. Two untrained systems measure that prior alone:

- ``document-prior``: ``score(q, d) = count(d)``, the number of training queries for which ``d`` is
  judged relevant (grade >= 1); ties go to the smaller doc id. It never reads the query: every query
  gets the same ranking.
- ``zero-shot+prior``: the backbone's own zero-shot score (cosine for all-MiniLM-L6-v2) plus
  ``beta * log(1 + count(d))``. ``beta`` is the value of :data:`BETA_GRID` with the best nDCG@10 on
  held-out training queries: the dev split the trainer would carve
  (:func:`~sbmoe.data.beir.train_dev_split` with the cell's training settings and seed), scored with the
  counts of the remaining training queries only; the smallest such value wins a tie. The test run
  then uses the counts of the whole training split.

The prior is always a property of the **evaluated** collection: its counts come from that
collection's own training split, also when a grid evaluates a cell trained on another collection
(transfer). A collection without the training split has no counts: ``document-prior`` then ranks
by doc id alone and ``zero-shot+prior`` keeps ``beta = 0`` (the zero-shot run).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.config.jobs import EncodeConfig, EvaluateConfig, JobOptions, SearchConfig
from sbmoe.config.train import TrainConfig
from sbmoe.core.artifacts import EVALUATION, evaluation_settings, writing_output
from sbmoe.core.choices import CONTROLS
from sbmoe.core.errors import UsageError
from sbmoe.core.runs import Run
from sbmoe.data.beir import BeirCollection, positive_pairs, train_dev_split
from sbmoe.evaluation.evaluate import save_evaluation
from sbmoe.evaluation.metrics import EvaluationResult, evaluate_run
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.search import search_documents
from sbmoe.training.procrustes import procrustes_model

# Cosine scores of one query's top documents lie within a few hundredths of each other, and
# log(1 + count) is 0.69 for a document relevant to one training query: from no effect to a dominant one.
BETA_GRID = (0.0, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)

Qrels = Mapping[str, Mapping[str, int]]


def document_counts(qrels: Qrels) -> dict[str, int]:
    """For each document judged relevant (grade >= 1) in ``qrels``, the number of such queries."""
    return dict(Counter(doc for _, doc in positive_pairs(qrels)))


def document_prior_run(
    counts: Mapping[str, int],
    doc_ids: Sequence[str],
    query_ids: Sequence[str],
    k: int,
    exclude_self: bool = False,
) -> Run:
    """The ``document-prior`` run: every query gets the ``k`` documents with the highest counts.

    Scores are the counts; equal counts are ranked by ascending doc id (the order
    :func:`~sbmoe.evaluation.metrics.evaluate_run` gives ties). Only query *ids* are read.
    """
    ranking = sorted(doc_ids, key=lambda doc: (-counts.get(doc, 0), doc))[: k + 1]
    run: Run = {}
    for query_id in query_ids:
        kept = [doc for doc in ranking if not (exclude_self and doc == query_id)][:k]
        run[query_id] = {doc: float(counts.get(doc, 0)) for doc in kept}
    return run


class PriorScorer:
    """Exact search by ``score(q, d) + beta * log(1 + count(d))`` over embedded documents.

    The bonus is one more dimension: documents carry ``log(1 + count)``, queries ``beta``, so one
    inner-product index serves every ``beta``; ``beta = 0`` is the plain zero-shot search.

    Args:
        doc_embeddings: ``(n_docs, d)`` document embeddings of the model.
        doc_ids: One id per row.
        counts: Training-query count per document (absent: 0).
    """

    def __init__(self, doc_embeddings: np.ndarray, doc_ids: Sequence[str], counts: Mapping[str, int]) -> None:
        bonus = np.log1p(np.array([counts.get(doc, 0) for doc in doc_ids], dtype=np.float32))
        vectors = np.hstack([np.asarray(doc_embeddings, dtype=np.float32), bonus[:, None]])
        self.index = DenseIndex(vectors, list(doc_ids), fingerprint="zero-shot+prior")

    def run(
        self,
        query_embeddings: np.ndarray,
        query_ids: Sequence[str],
        beta: float,
        k: int,
        exclude_self: bool = False,
    ) -> Run:
        """The top-``k`` documents of every query under weight ``beta``."""
        queries = np.asarray(query_embeddings, dtype=np.float32)
        weights = np.full((len(queries), 1), beta, dtype=np.float32)
        return self.index.search(np.hstack([queries, weights]), k, list(query_ids), exclude_self)


@dataclass(frozen=True)
class ZeroShotModel:
    """The untrained model a control builds on, how it encodes, and the pooled-embedding cache.

    Attributes:
        retriever: The model (``zero-shot+prior`` adds to its scores; ``procrustes`` maps its
            query embeddings).
        encode: How ``retriever`` encodes.
        cache: Pooled-embedding cache.
    """

    retriever: Retriever
    encode: EncodeConfig = field(default_factory=EncodeConfig)
    cache: EmbeddingCache | None = None

    def options(self) -> JobOptions:
        """How the control encodes with the model: through the cache, without progress bars."""
        return JobOptions(show_progress=False, cache=self.cache)


@dataclass
class ControlOutput:
    """One evaluated control: its scores, the seconds it took and how it was set up (``details``)."""

    result: EvaluationResult
    seconds: float
    details: dict[str, Any]


def evaluate_control(
    control: str,
    collection: BeirCollection,
    output_dir: str | Path,
    config: EvaluateConfig,
    train_config: TrainConfig,
    zero_shot: ZeroShotModel | None = None,
) -> ControlOutput:
    """Run ``control`` on the split's queries and write the files a model's evaluation has.

    ``output_dir`` gets ``metrics.json``, ``per_query.json``, ``run.trec`` and ``config.json``
    (with ``control`` and ``details``: the prior's split, and for ``zero-shot+prior`` the chosen
    ``beta`` and the dev nDCG@10 of every candidate).

    Args:
        control: One of :data:`CONTROLS`.
        collection: The evaluated collection; its own training split gives the counts.
        output_dir: Where the files go.
        config: Split, depth, metrics and ``exclude_self``, as for a model.
        train_config: ``train_split`` (the counts), and the dev carve (``dev_split``,
            ``dev_fraction``, ``seed``) that ``beta`` is chosen on.
        zero_shot: The untrained model ``zero-shot+prior`` and ``procrustes`` build on, with how it
            encodes (unused by ``document-prior``).

    Raises:
        UsageError: An unknown control, or ``zero-shot+prior`` without a retriever.
    """
    if control not in CONTROLS:
        raise UsageError(f"unknown control {control!r}; choose one of {list(CONTROLS)}")
    if control != "document-prior" and zero_shot is None:
        raise UsageError(f"{control} needs the zero-shot model")
    started = time.perf_counter()
    qrels = collection.split_qrels(config.split)
    query_ids = sorted(q for q in qrels if q in collection.queries)
    doc_ids = list(collection.corpus)
    split = train_config.train_split
    counts = document_counts(collection.qrels[split]) if split in collection.qrels else {}
    details: dict[str, Any] = {"prior_split": split, "documents_with_prior": len(counts)}
    model: Retriever | None = None  # the fitted procrustes model, saved beside its scores
    if control == "document-prior":
        fingerprint = "document-prior"
        run = document_prior_run(counts, doc_ids, query_ids, config.top_k, config.exclude_self)
    elif control == "procrustes":
        retriever, encode = zero_shot.retriever, zero_shot.encode
        model = procrustes_model(retriever, collection, train_config, encode, zero_shot.cache)
        fingerprint = f"procrustes:{model.fingerprint()}"
        run = search_documents(
            model,
            {q: collection.queries[q] for q in query_ids},
            {d: collection.corpus[d].full_text for d in doc_ids},
            SearchConfig(top_k=config.top_k, exclude_self=config.exclude_self),
            encode,
            zero_shot.options(),
        )["model"]
        details.update({"pairs_split": split, "model": "model"})
    else:
        retriever, encode, options = zero_shot.retriever, zero_shot.encode, zero_shot.options()
        fingerprint = f"zero-shot+prior:{retriever.fingerprint()}"
        documents = encode_texts(
            retriever, [collection.corpus[d].full_text for d in doc_ids], "document", encode, options=options
        )
        beta, dev_scores, dev_queries = 0.0, {}, 0
        if counts:
            beta, dev_scores, dev_queries = choose_beta(
                zero_shot, collection, documents, train_config, config.exclude_self
            )
        queries = encode_texts(
            retriever, [collection.queries[q] for q in query_ids], "query", encode, options=options
        )
        run = PriorScorer(documents, doc_ids, counts).run(
            queries, query_ids, beta, config.top_k, config.exclude_self
        )
        details.update({"beta": beta, "dev_ndcg@10": dev_scores, "dev_queries": dev_queries})
    settings = evaluation_settings(fingerprint, config, collection.name)
    record = {
        "control": control,
        "details": details,
        "model_fingerprint": fingerprint,
        "data": {"name": collection.name, "root": str(collection.root)},
    }
    output_dir = Path(output_dir)
    with writing_output(output_dir, EVALUATION, settings):
        result = save_evaluation(collection, run, output_dir, config, "model", record)
        if control == "procrustes":
            model.save(output_dir / "model")  # query-side: it serves from the backbone's index
    return ControlOutput(result, round(time.perf_counter() - started, 2), details)


def choose_beta(
    zero_shot: ZeroShotModel,
    collection: BeirCollection,
    documents: np.ndarray,
    train_config: TrainConfig,
    exclude_self: bool = False,
) -> tuple[float, dict[str, float], int]:
    """The weight of :data:`BETA_GRID` with the best dev nDCG@10, every candidate's score, and the
    number of dev queries.

    Dev is the held-out part of the training split that :func:`~sbmoe.data.beir.train_dev_split` gives
    for ``train_config``; the counts come from the rest of the training split only.

    Args:
        zero_shot: The model, how it encodes the dev queries, and its cache.
        collection: The collection whose training split is carved.
        documents: The corpus embeddings of ``zero_shot.retriever``, in corpus order.
        train_config: The training split and its dev carve.
        exclude_self: Drop a retrieved document whose id equals the query id.
    """
    train_qrels, dev_qrels = train_dev_split(
        collection,
        train_config.train_split,
        train_config.dev_split,
        train_config.dev_fraction,
        train_config.seed,
    )
    dev_qrels = {q: judged for q, judged in dev_qrels.items() if q in collection.queries}
    dev_ids = sorted(dev_qrels)
    texts = [collection.queries[q] for q in dev_ids]
    queries = encode_texts(zero_shot.retriever, texts, "query", zero_shot.encode, options=zero_shot.options())
    scorer = PriorScorer(documents, list(collection.corpus), document_counts(train_qrels))
    scores = {}
    for beta in BETA_GRID:
        run = scorer.run(queries, dev_ids, beta, 10, exclude_self)
        scores[beta] = evaluate_run(dev_qrels, run, metrics=("ndcg@10",)).metrics["ndcg@10"]
    best = max(BETA_GRID, key=lambda beta: (scores[beta], -beta))
    return best, {str(beta): score for beta, score in scores.items()}, len(dev_ids)
