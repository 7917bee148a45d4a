"""The retrieval jobs: index a corpus (or a shard of it), merge index shards, search, evaluate.

Texts go in, ranx-style runs come out. Each job takes config dataclasses from :mod:`sbmoe.config`
(:class:`~sbmoe.config.EncodeConfig` for how texts are encoded, :class:`~sbmoe.config.IndexConfig`,
:class:`~sbmoe.config.SearchConfig`, :class:`~sbmoe.config.EvaluateConfig`), and the jobs that write
outputs save their configs and provenance beside them. Two searches: :func:`search` over an index
(in memory or saved, single or sharded) and :func:`search_documents` over texts without keeping an
index, for one or several inference rules of an MoE model from one encoding pass.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sbmoe.cache import EmbeddingCache
from sbmoe.config import EncodeConfig, EvaluateConfig, IndexConfig, SearchConfig, provenance
from sbmoe.data import BeirCollection
from sbmoe.distributed import shard_bounds
from sbmoe.encoding import apply_head_stages, encode_texts, expert_pooling
from sbmoe.errors import UsageError
from sbmoe.evaluation import EvaluationResult, evaluate_run, save_metrics, write_trec_run
from sbmoe.index import DenseIndex, shard_directory
from sbmoe.io import write_json
from sbmoe.modeling import Retriever
from sbmoe.outputs import EVALUATION, INDEX, SHARDED_INDEX, check_output, writing_output
from sbmoe.query_groups import group_scores, split_query_groups
from sbmoe.runs import Run
from sbmoe.runtime import resolve_inference
from sbmoe.shards import ShardedIndex, load_index


@dataclass
class EvaluationOutput:
    """One evaluated system: where its files are, its scores and how long encoding and search took."""

    name: str
    output_dir: Path
    result: EvaluationResult
    seconds: float
    # Seen / partly-seen / unseen: query count and metric means each (None: no training split).
    query_groups: dict[str, dict[str, Any]] | None = None


# Documents encoded (and kept) at a time while indexing, so that an interrupted index resumes.
INDEX_CHUNK_SIZE = 4096


def build_index(
    retriever: Retriever,
    documents: Mapping[str, str],
    config: IndexConfig | None = None,
    encode: EncodeConfig | None = None,
    *,
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
) -> DenseIndex:
    """Encode ``documents`` (doc id -> text) into a FAISS inner-product index tagged with the model.

    ``config`` chooses the index type (none given: ``flat``, exact), IVF cells and the embeddings'
    storage dtype (none given: ``float32``); see :class:`~sbmoe.index.DenseIndex`.
    """
    config = config or IndexConfig()
    embeddings = encode_texts(
        retriever,
        list(documents.values()),
        "document",
        encode,
        show_progress=show_progress,
        cache=cache,
        chunk_size=INDEX_CHUNK_SIZE,
    )
    return DenseIndex(
        embeddings,
        list(documents),
        retriever.fingerprint(),
        index_type=config.index_type or "flat",
        nlist=config.nlist,
        nprobe=config.nprobe,
        dtype=config.embedding_dtype or "float32",
    )


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
    shard by shard). A saved index built by another model is refused
    (:class:`~sbmoe.index.IndexMismatchError`); for one in memory that is the caller's job. A saved
    index is checked against its checksum: its size and a sample, or in full with ``verify``.
    """
    config = config or SearchConfig()
    if isinstance(index, (str, os.PathLike)):
        index = load_index(index, expected_fingerprint=retriever.fingerprint(), verify=verify)
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
    pooled_documents = encode_texts(
        retriever,
        list(documents.values()),
        "document",
        encode,
        pooled_only=True,
        show_progress=show_progress,
        cache=cache,
    )
    pooled_queries = encode_texts(
        retriever, list(queries.values()), "query", encode, pooled_only=True, cache=cache
    )
    runs = {}
    for rule in expert_poolings or [None]:
        with expert_pooling(retriever, rule):
            name = retriever.head.expert_pooling if retriever.head is not None else "model"
            index = DenseIndex(
                apply_head_stages(retriever, pooled_documents), list(documents), retriever.fingerprint()
            )
            runs[name] = index.search(
                apply_head_stages(retriever, pooled_queries),
                config.top_k,
                query_ids=list(queries),
                exclude_self=config.exclude_self,
            )
    return runs


def evaluate_model(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: str | Path,
    config: EvaluateConfig | None = None,
    encode: EncodeConfig | None = None,
    *,
    show_progress: bool = True,
    command: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
    overwrite: bool = False,
) -> list[EvaluationOutput]:
    """Search the split's queries over the whole corpus and score the run.

    Writes ``metrics.json``, ``per_query.json``, ``run.trec`` and ``config.json`` (the configs and
    :func:`~sbmoe.config.provenance`) into ``output_dir``, or into ``output_dir/<rule>/`` per
    inference rule when several are asked for. When ``collection`` holds a ``train`` split (and the
    evaluated split is another), ``metrics.json`` also breaks the scores down into seen, partly-seen
    and unseen queries and ``query_groups.json`` lists them (:mod:`sbmoe.query_groups`).
    ``config.expert_poolings`` are ignored for a model without an MoE head.

    Args:
        overwrite: Replace an earlier evaluation in ``output_dir`` made with other settings (see
            :func:`~sbmoe.outputs.check_output`; anything but an evaluation there is refused anyway).
    """
    config = config or EvaluateConfig()
    encode = encode or EncodeConfig()
    output_dir = Path(output_dir)
    fingerprint = retriever.fingerprint()
    settings = {
        "model_fingerprint": fingerprint,
        "evaluate_config": dataclasses.asdict(config),
        "data": collection.name,
    }
    with writing_output(output_dir, EVALUATION, settings, overwrite=overwrite) as replacing:
        if replacing:
            shutil.rmtree(output_dir)  # an earlier evaluation, with other settings: --overwrite
        return _evaluate(
            retriever, collection, output_dir, config, encode, fingerprint, show_progress, command, cache
        )


def _evaluate(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: Path,
    config: EvaluateConfig,
    encode: EncodeConfig,
    fingerprint: str,
    show_progress: bool,
    command: Sequence[str] | None,
    cache: EmbeddingCache | None,
) -> list[EvaluationOutput]:
    qrels = collection.split_qrels(config.split)
    # Seen / partly-seen / unseen queries, on collections with a training split (sbmoe.query_groups).
    groups = split_query_groups(collection.qrels, config.split)
    queries = {q: collection.queries[q] for q in sorted(qrels) if q in collection.queries}
    documents = {d: doc.full_text for d, doc in collection.corpus.items()}
    retriever.warn_truncated(list(queries.values()), "query", f"{collection.name} {config.split} queries")
    retriever.warn_truncated(list(documents.values()), "document", f"{collection.name} corpus")
    started = time.perf_counter()
    runs = search_documents(
        retriever,
        queries,
        documents,
        SearchConfig(top_k=config.top_k, exclude_self=config.exclude_self),
        encode,
        expert_poolings=config.expert_poolings if retriever.head is not None else (),
        show_progress=show_progress,
        cache=cache,
    )
    seconds = time.perf_counter() - started

    outputs = []
    for rule, run in runs.items():
        target = output_dir / rule if len(runs) > 1 else output_dir
        record = {
            "encode_config": dataclasses.asdict(encode),
            "encoding": encoding_used(retriever, encode),
            "model_config": dataclasses.asdict(retriever.config),
            "model_fingerprint": fingerprint,
            "expert_pooling": rule,
            "data": {"name": collection.name, "root": str(collection.root)},
            "encode_and_search_seconds": round(seconds, 2),
            **provenance(command),
        }
        result = save_evaluation(qrels, run, target, config, rule, record, groups)
        group_summary = group_scores(result.per_query, groups) if groups is not None else None
        outputs.append(EvaluationOutput(rule, target, result, seconds, group_summary))
    return outputs


def save_evaluation(
    qrels: Mapping[str, Mapping[str, int]],
    run: Run,
    target: Path,
    config: EvaluateConfig,
    rule: str,
    record: Mapping[str, Any],
    groups: Mapping[str, Sequence[str]] | None = None,
) -> EvaluationResult:
    """Score ``run`` and write ``metrics.json``, ``per_query.json``, ``run.trec`` and ``config.json``.

    The files every evaluated system has (a model under one inference rule, or a control):
    ``config.json`` holds ``config`` as ``evaluate_config`` and then ``record``; with ``groups``
    (:func:`sbmoe.query_groups.split_query_groups`), ``metrics.json`` scores each group too.
    """
    result = evaluate_run(qrels, run, metrics=tuple(config.metrics))
    save_metrics(result, target, extra={"split": config.split, "expert_pooling": rule}, query_groups=groups)
    write_trec_run(run, target / "run.trec", tag=f"sbmoe-{rule}")
    write_json(target / "config.json", {"evaluate_config": dataclasses.asdict(config), **record})
    return result


def index_corpus(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: str | Path,
    config: IndexConfig | None = None,
    encode: EncodeConfig | None = None,
    *,
    shard: tuple[int, int] | None = None,
    show_progress: bool = True,
    command: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
    overwrite: bool = False,
) -> DenseIndex:
    """Encode the collection's corpus and save the FAISS index (with the model's fingerprint).

    The index's metadata records the collection, the model, index and encode configs, and
    :func:`~sbmoe.config.provenance`.

    Args:
        shard: ``(i, N)``: encode only the ``i``-th of ``N`` consecutive slices of the corpus and
            save it as that shard of the sharded index ``output_dir`` (see
            :class:`~sbmoe.shards.ShardedIndex`); shards can be built by different processes or
            machines. ``None`` indexes the whole corpus into ``output_dir``.
        overwrite: Replace an earlier index in ``output_dir`` made from another model, collection
            or index config (anything but an index there is refused anyway; see
            :func:`~sbmoe.outputs.check_output`).

    Returns:
        The index built (the shard's, when sharded).
    """
    config = config or IndexConfig()
    encode = encode or EncodeConfig()
    doc_ids = list(collection.corpus)
    start, stop = shard_bounds(len(doc_ids), *shard) if shard else (0, len(doc_ids))
    if stop == start:
        raise UsageError(f"shard {shard[0]}/{shard[1]} of {len(doc_ids)} documents is empty: use fewer")
    documents = {d: collection.corpus[d].full_text for d in doc_ids[start:stop]}
    if shard:
        check_output(output_dir, SHARDED_INDEX)
    target = shard_directory(output_dir, *shard) if shard else Path(output_dir)
    settings = {
        "fingerprint": retriever.fingerprint(),
        "collection": collection.name,
        "index_config": dataclasses.asdict(config),
    }
    # Without a cache of the caller's, encoded chunks wait beside the output until the index is saved:
    # a killed run, run again, encodes only what is missing.
    chunks = target.parent / f".{target.name}.chunks"
    with writing_output(target, INDEX, settings, overwrite=overwrite):
        retriever.warn_truncated(list(documents.values()), "document", f"{collection.name} corpus")
        index = build_index(
            retriever,
            documents,
            config,
            encode,
            show_progress=show_progress,
            cache=cache or EmbeddingCache(chunks),
        )
        index.metadata.update(
            {
                "collection": collection.name,
                "model_config": dataclasses.asdict(retriever.config),
                "index_config": dataclasses.asdict(config),
                "encode_config": dataclasses.asdict(encode),
                "encoding": encoding_used(retriever, encode),
                **provenance(command),
            }
        )
        if shard:
            index.save_shard(output_dir, shard[0], shard[1], start, len(collection.corpus))
        else:
            index.save(output_dir)
        shutil.rmtree(chunks, ignore_errors=True)
    return index


def merge_index(
    index_dir: str | Path,
    output_dir: str | Path,
    config: IndexConfig | None = None,
    *,
    command: Sequence[str] | None = None,
    overwrite: bool = False,
) -> DenseIndex:
    """Merge the shards in ``index_dir`` into one index saved in ``output_dir``.

    The merged index ranks exactly like a single-process index of the same type (for ``flat``,
    the same index). ``config``'s index type and dtype may differ from the shards' (e.g. exact
    shards, IVF merged; float32 shards, float16 merged) and default to theirs. The metadata keeps
    the shards' and adds the merge's :func:`~sbmoe.config.provenance` under ``merge``.
    """
    config = config or IndexConfig()
    sharded = ShardedIndex.load(index_dir)
    merged = sharded.merge(
        config.index_type, nlist=config.nlist, nprobe=config.nprobe, dtype=config.embedding_dtype
    )
    merged.metadata["merge"] = {"index_config": dataclasses.asdict(config), **provenance(command)}
    merged.save(output_dir)
    return merged


def encoding_used(retriever: Retriever, encode: EncodeConfig) -> dict[str, str]:
    """The backend and precision that ``encode`` resolves to for ``retriever`` here, and why."""
    plan = resolve_inference(encode.backend, encode.precision, retriever.device)
    return {"backend": plan.backend, "precision": plan.precision, "reason": plan.reason}


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
