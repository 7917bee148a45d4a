"""The jobs behind the CLI: evaluate a model on a split, index a corpus (or a shard of it), merge
index shards, search an index.

Each job takes a config dataclass and writes its outputs, with the config and command beside them.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbmoe import __version__
from sbmoe.cache import EmbeddingCache
from sbmoe.data import BeirCollection
from sbmoe.distributed import shard_bounds
from sbmoe.errors import UsageError
from sbmoe.evaluation import PAPER_METRICS, EvaluationResult, evaluate_run, save_metrics, write_trec_run
from sbmoe.index import DenseIndex
from sbmoe.io import write_json
from sbmoe.modeling import Retriever
from sbmoe.retrieval import Run, build_index, search, search_per_expert_pooling
from sbmoe.shards import ShardedIndex, load_index


@dataclass
class EvaluateConfig:
    """Settings of an evaluation.

    Attributes:
        split: Qrels split whose queries are searched.
        top_k: Documents retrieved per query (at least the deepest metric cut-off).
        batch_size: Texts per forward pass when encoding.
        precision: ``fp32``, ``bf16`` or ``auto``.
        exclude_self: Drop a retrieved document whose id equals the query id.
        expert_poolings: Inference rules to evaluate for an MoE model (e.g. ``["top1", "all"]``);
            empty means the rule saved with the model. The backbone runs once for all of them.
        metrics: ranx metric names.
    """

    split: str = "test"
    top_k: int = 100
    batch_size: int = 64
    precision: str = "auto"
    exclude_self: bool = False
    expert_poolings: list[str] = field(default_factory=list)
    metrics: list[str] = field(default_factory=lambda: list(PAPER_METRICS))


@dataclass
class EvaluationOutput:
    """One evaluated system: where its files are, its scores and how long encoding and search took."""

    name: str
    output_dir: Path
    result: EvaluationResult
    seconds: float


def evaluate_model(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: str | Path,
    config: EvaluateConfig | None = None,
    show_progress: bool = True,
    command: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
) -> list[EvaluationOutput]:
    """Search the split's queries over the whole corpus and score the run.

    Writes ``metrics.json``, ``per_query.json``, ``run.trec`` and ``config.json`` into
    ``output_dir`` (or into ``output_dir/<rule>/`` per inference rule when several are asked for).
    """
    config = config or EvaluateConfig()
    output_dir = Path(output_dir)
    qrels = collection.split_qrels(config.split)
    query_ids = sorted(q for q in qrels if q in collection.queries)
    queries = [collection.queries[q] for q in query_ids]
    doc_ids = list(collection.corpus)
    documents = [collection.corpus[d].full_text for d in doc_ids]
    started = time.perf_counter()
    encode = {
        "batch_size": config.batch_size,
        "precision": config.precision,
        "show_progress": show_progress,
        "cache": cache,
    }
    runs: dict[str, Run]
    if config.expert_poolings and retriever.head is not None:
        runs = search_per_expert_pooling(
            retriever,
            query_ids,
            queries,
            doc_ids,
            documents,
            config.expert_poolings,
            top_k=config.top_k,
            exclude_self=config.exclude_self,
            **encode,
        )
    else:
        index = build_index(retriever, doc_ids, documents, **encode)
        encode["show_progress"] = False
        run = search(retriever, index, query_ids, queries, config.top_k, config.exclude_self, **encode)
        rule = retriever.head.expert_pooling if retriever.head is not None else "model"
        runs = {rule: run}
    seconds = time.perf_counter() - started

    outputs = []
    for rule, run in runs.items():
        target = output_dir / rule if len(runs) > 1 else output_dir
        result = evaluate_run(qrels, run, metrics=tuple(config.metrics))
        save_metrics(result, target, extra={"split": config.split, "expert_pooling": rule})
        write_trec_run(run, target / "run.trec", tag=f"sbmoe-{rule}")
        write_json(
            target / "config.json",
            {
                "evaluate_config": dataclasses.asdict(config),
                "model_config": dataclasses.asdict(retriever.config),
                "model_fingerprint": retriever.fingerprint(),
                "expert_pooling": rule,
                "data": {"name": collection.name, "root": str(collection.root)},
                "encode_and_search_seconds": round(seconds, 2),
                "command": list(command) if command is not None else sys.argv,
                "sbmoe_version": __version__,
            },
        )
        outputs.append(EvaluationOutput(rule, target, result, seconds))
    return outputs


def index_corpus(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: str | Path,
    batch_size: int = 64,
    precision: str = "auto",
    index_type: str = "flat",
    show_progress: bool = True,
    command: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
    shard: tuple[int, int] | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    dtype: str = "float32",
) -> DenseIndex:
    """Encode the collection's corpus and save the FAISS index (with the model's fingerprint).

    Args:
        shard: ``(i, N)``: encode only the ``i``-th of ``N`` consecutive slices of the corpus and
            save it as that shard of the sharded index ``output_dir`` (see
            :class:`~sbmoe.shards.ShardedIndex`); shards can be built by different processes or
            machines. ``None`` indexes the whole corpus into ``output_dir``.
        nlist: IVF cells (``index_type="ivf"``).
        nprobe: IVF cells searched per query.
        dtype: How the index stores the embeddings: ``float32`` or ``float16`` (half the memory
            and disk); independent of ``precision``, which is the encoder's.

    Returns:
        The index built (the shard's, when sharded).
    """
    doc_ids = list(collection.corpus)
    start, stop = shard_bounds(len(doc_ids), *shard) if shard else (0, len(doc_ids))
    if stop == start:
        raise UsageError(f"shard {shard[0]}/{shard[1]} of {len(doc_ids)} documents is empty: use fewer")
    doc_ids = doc_ids[start:stop]
    documents = [collection.corpus[d].full_text for d in doc_ids]
    index = build_index(
        retriever,
        doc_ids,
        documents,
        batch_size,
        precision,
        index_type,
        show_progress,
        cache,
        nlist,
        nprobe,
        dtype,
    )
    index.metadata.update(
        {
            "collection": collection.name,
            "model_config": dataclasses.asdict(retriever.config),
            "precision": precision,
            "command": list(command) if command is not None else sys.argv,
        }
    )
    if shard:
        index.save_shard(output_dir, shard[0], shard[1], start, len(collection.corpus))
    else:
        index.save(output_dir)
    return index


def merge_index(
    index_dir: str | Path,
    output_dir: str | Path,
    index_type: str | None = None,
    nlist: int | None = None,
    nprobe: int | None = None,
    command: Sequence[str] | None = None,
    dtype: str | None = None,
) -> DenseIndex:
    """Merge the shards in ``index_dir`` into one index saved in ``output_dir``.

    The merged index ranks exactly like a single-process index of the same type (for ``flat``,
    the same index); ``index_type`` and ``dtype`` may differ from the shards' (e.g. exact shards,
    IVF merged; float32 shards, float16 merged) and default to theirs.
    """
    sharded = ShardedIndex.load(index_dir)
    merged = sharded.merge(index_type, nlist=nlist, nprobe=nprobe, dtype=dtype)
    merged.metadata["merge_command"] = list(command) if command is not None else sys.argv
    merged.save(output_dir)
    return merged


def search_index(
    retriever: Retriever,
    index_dir: str | Path,
    queries: dict[str, str],
    top_k: int = 10,
    exclude_self: bool = False,
    batch_size: int = 64,
    precision: str = "auto",
) -> Run:
    """Search a saved index, single or sharded (shard by shard); refuses an index another model built."""
    index = load_index(index_dir, expected_fingerprint=retriever.fingerprint())
    query_ids = list(queries)
    return search(
        retriever,
        index,
        query_ids,
        [queries[q] for q in query_ids],
        top_k,
        exclude_self,
        batch_size=batch_size,
        precision=precision,
    )


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
