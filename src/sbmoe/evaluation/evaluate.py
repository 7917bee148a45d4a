"""The evaluate job: search a split's queries over the whole corpus, score the run and write it.

Writes ``metrics.json``, ``per_query.json``, ``run.trec`` and ``config.json`` per evaluated system
(a model under one inference rule, or a control), with seen / unseen query groups where the
collection has a training split.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbmoe.config.jobs import EncodeConfig, EvaluateConfig, JobOptions, SearchConfig
from sbmoe.config.provenance import provenance
from sbmoe.core.artifacts import EVALUATION, evaluation_settings, remove_own_entries, writing_output
from sbmoe.core.errors import UsageError
from sbmoe.core.io import write_json
from sbmoe.core.layouts import EVALUATION_FILES
from sbmoe.core.runs import Run
from sbmoe.data.beir import BeirCollection
from sbmoe.evaluation.metrics import EvaluationResult, evaluate_run, save_metrics, write_trec_run
from sbmoe.evaluation.query_groups import group_scores, split_query_groups
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import open_index
from sbmoe.retrieval.indexing import encoding_used
from sbmoe.retrieval.search import search, search_documents


@dataclass
class EvaluationOutput:
    """One evaluated system: where its files are, its scores and how long encoding and search took."""

    name: str
    output_dir: Path
    result: EvaluationResult
    seconds: float
    # Seen / partly-seen / unseen: query count and metric means each (None: no training split).
    query_groups: dict[str, dict[str, Any]] | None = None


def evaluate_model(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: str | Path,
    config: EvaluateConfig | None = None,
    encode: EncodeConfig | None = None,
    options: JobOptions | None = None,
) -> list[EvaluationOutput]:
    """Search the split's queries over the whole corpus and score the run.

    Writes ``metrics.json``, ``per_query.json``, ``run.trec`` and ``config.json`` (the configs and
    :func:`~sbmoe.config.provenance.provenance`) into ``output_dir``, or into ``output_dir/<rule>/`` per
    inference rule when several are asked for. When ``collection`` holds a ``train`` split (and the
    evaluated split is another), ``metrics.json`` also breaks the scores down into seen, partly-seen
    and unseen queries and ``query_groups.json`` lists them (:mod:`sbmoe.evaluation.query_groups`).
    ``config.expert_poolings`` are ignored, with a warning, for a model without an MoE head. With
    ``config.corpus_index`` (a saved index or a store URI) the queries are searched there instead of
    over the freshly encoded corpus, under the model's own rule only.

    Args:
        options: Progress bars, the command recorded, the embedding cache, and ``overwrite``: replace
            an earlier evaluation in ``output_dir`` made with other settings (anything but an
            evaluation there is refused anyway; see :func:`~sbmoe.core.artifacts.writing_output`).
    """
    options = options or JobOptions()
    config = config or EvaluateConfig()
    encode = encode or EncodeConfig()
    if config.expert_poolings and retriever.head is None:
        warnings.warn(
            f"expert_poolings {config.expert_poolings} are ignored: {retriever.config.backbone} has no "
            "MoE head; evaluating the model as it is",
            UserWarning,
            stacklevel=2,
        )
    output_dir = Path(output_dir)
    fingerprint = retriever.fingerprint()
    settings = evaluation_settings(fingerprint, config, collection.name)
    with writing_output(output_dir, EVALUATION, settings, overwrite=options.overwrite) as replacing:
        if replacing:
            remove_own_entries(output_dir, EVALUATION)  # an earlier one, other settings: --overwrite
        return _evaluate(retriever, collection, output_dir, config, encode, fingerprint, options)


def _evaluate(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: Path,
    config: EvaluateConfig,
    encode: EncodeConfig,
    fingerprint: str,
    options: JobOptions,
) -> list[EvaluationOutput]:
    qrels = collection.split_qrels(config.split)
    # Seen / partly-seen / unseen queries, on collections with a training split (evaluation.query_groups).
    groups = split_query_groups(collection.qrels, config.split)
    queries = {q: collection.queries[q] for q in sorted(qrels) if q in collection.queries}
    retriever.warn_truncated(list(queries.values()), "query", f"{collection.name} {config.split} queries")
    started = time.perf_counter()
    if config.corpus_index:
        runs = _search_index(retriever, collection.name, queries, config, encode, options)
    else:
        documents = {d: doc.full_text for d, doc in collection.corpus.items()}
        retriever.warn_truncated(list(documents.values()), "document", f"{collection.name} corpus")
        runs = search_documents(
            retriever,
            queries,
            documents,
            SearchConfig(
                top_k=config.top_k,
                exclude_self=config.exclude_self,
                expert_poolings=config.expert_poolings if retriever.head is not None else [],
            ),
            encode,
            options,
        )
    seconds = time.perf_counter() - started

    outputs = []
    for rule, run in runs.items():
        target = output_dir / rule if len(runs) > 1 else output_dir
        record = {
            "encode_config": encode.to_dict(),
            "encoding": encoding_used(retriever, encode),
            "model_config": retriever.config.to_dict(),
            "model_fingerprint": fingerprint,
            "expert_pooling": rule,
            "data": {"name": collection.name, "root": str(collection.root)},
            "encode_and_search_seconds": round(seconds, 2),
            **provenance(options.command),
        }
        result = save_evaluation(collection, run, target, config, rule, record)
        group_summary = group_scores(result.per_query, groups) if groups is not None else None
        outputs.append(EvaluationOutput(rule, target, result, seconds, group_summary))
    return outputs


def _search_index(
    retriever: Retriever,
    collection_name: str,
    queries: Mapping[str, str],
    config: EvaluateConfig,
    encode: EncodeConfig,
    options: JobOptions,
) -> dict[str, Run]:
    """The run of ``queries`` over ``config.corpus_index`` (FAISS directory or store URI), model's rule."""
    rule = retriever.head.expert_pooling if retriever.head is not None else "model"
    others = sorted(set(config.expert_poolings) - {rule}) if retriever.head is not None else []
    if others:
        raise UsageError(
            f"--index holds the corpus encoded under the model's own rule ({rule}); --expert-pooling "
            f"{' '.join(others)} needs it encoded under each: leave out --index"
        )
    index = open_index(config.corpus_index, expected_fingerprint=retriever.index_fingerprints())
    built_from = index.metadata.get("collection")
    if built_from is not None and built_from != collection_name:
        raise UsageError(
            f"the index {config.corpus_index} was built from {built_from!r}, not {collection_name!r}"
        )
    search_config = SearchConfig(top_k=config.top_k, exclude_self=config.exclude_self)
    return {rule: search(retriever, index, queries, search_config, encode, options)}


def save_evaluation(
    collection: BeirCollection,
    run: Run,
    target: Path,
    config: EvaluateConfig,
    rule: str,
    record: Mapping[str, Any],
) -> EvaluationResult:
    """Score ``run`` on ``collection``'s ``config.split`` and write ``metrics.json``, ``per_query.json``,
    ``run.trec`` and ``config.json``.

    The files every evaluated system has (a model under one inference rule, or a control):
    ``config.json`` holds ``config`` as ``evaluate_config`` and then ``record``; on a collection with
    a training split, ``metrics.json`` scores each query group too
    (:func:`sbmoe.evaluation.query_groups.split_query_groups`).
    """
    qrels = collection.split_qrels(config.split)
    groups = split_query_groups(collection.qrels, config.split)
    result = evaluate_run(qrels, run, metrics=tuple(config.metrics))
    save_metrics(result, target, extra={"split": config.split, "expert_pooling": rule}, query_groups=groups)
    write_trec_run(run, target / EVALUATION_FILES.run, tag=f"sbmoe-{rule}")
    write_json(target / EVALUATION_FILES.config, {"evaluate_config": config.to_dict(), **record})
    return result
