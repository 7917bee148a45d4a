"""The demo: zero-shot vs fine-tuned vs SB-MoE on one collection, in one table.

Runs, in one process: sentence-transformers' own ``encode`` + exact search (the reference the
zero-shot row must match), the zero-shot model through sbmoe, the fine-tuned baseline (no head),
and SB-MoE (trained once with top-1 routing, evaluated with ``top1`` and ``all``). Finished stages
are reused when the demo is run again with the same settings.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe import __version__
from sbmoe.cache import EmbeddingCache
from sbmoe.config import ModelConfig, TrainConfig, build_configs
from sbmoe.data import BeirCollection, load_collection, resolve_data
from sbmoe.errors import UsageError
from sbmoe.evaluation import PAPER_METRICS, EvaluationResult, evaluate_run, save_metrics
from sbmoe.io import read_json, write_json
from sbmoe.modeling import Retriever, resolve_backbone
from sbmoe.pipeline import EvaluateConfig, evaluate_model
from sbmoe.runtime import resolve_precision
from sbmoe.training import train

TABLE_METRICS = PAPER_METRICS


@dataclass
class DemoConfig:
    """Settings of the demo; the defaults fit 20 minutes on a 2-core CPU with SciFact.

    Both trained systems keep their last checkpoint by default: with one epoch the only choice
    ``best`` has is the starting model versus the trained one, and SciFact's dev slice (81 held-out
    training queries) is too small to make that choice reliably. Dev nDCG@10 is still logged.
    """

    data: str = "scifact"
    model: str = "all-MiniLM-L6-v2"
    output: str = "runs/demo"
    epochs: int = 1
    batch_size: int = 32
    num_experts: int = 6
    gating: str = "learned"
    max_query_length: int = 64
    max_doc_length: int = 256
    dev_max_docs: int | None = None
    precision: str = "auto"
    seed: int = 42
    checkpoint_selection: str = "last"
    reference: bool = True
    split: str = "test"


@dataclass
class DemoRow:
    """One system in the comparison table."""

    system: str
    metrics: dict[str, float]
    train_seconds: float | None
    encode_seconds: float
    output_dir: str


@dataclass
class DemoReport:
    """The demo's results, renderable as Markdown and JSON."""

    config: DemoConfig
    rows: list[DemoRow] = field(default_factory=list)
    budget: dict[str, Any] = field(default_factory=dict)
    wall_seconds: float = 0.0

    def zero_shot_gap(self) -> float | None:
        """nDCG@10 of sbmoe's zero-shot row minus the sentence-transformers reference."""
        by_name = {row.system: row for row in self.rows}
        ours, ref = by_name.get("zero-shot (sbmoe)"), by_name.get("zero-shot (sentence-transformers encode)")
        if ours is None or ref is None:
            return None
        return ours.metrics["ndcg@10"] - ref.metrics["ndcg@10"]

    def markdown(self) -> str:
        """The comparison table, with the budget above it."""
        header = ["system", *TABLE_METRICS, "train s", "test eval s"]
        lines = [
            f"Collection `{self.config.data}` ({self.config.split}), backbone `{self.config.model}`",
            "",
            "Budget: " + ", ".join(f"{k} {v}" for k, v in self.budget.items()),
            "",
            "| " + " | ".join(header) + " |",
            "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|",
        ]
        for row in self.rows:
            cells = [row.system, *(f"{row.metrics[m]:.4f}" for m in TABLE_METRICS)]
            cells.append("—" if row.train_seconds is None else f"{row.train_seconds:.0f}")
            cells.append(f"{row.encode_seconds:.0f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines += [
            "",
            "train s includes the dev evaluations; a trained model's last dev evaluation encodes the "
            "corpus, and its test evaluation reuses those embeddings through the cache.",
        ]
        gap = self.zero_shot_gap()
        if gap is not None:
            lines += ["", f"zero-shot nDCG@10, sbmoe minus sentence-transformers: {gap:+.4f}"]
        lines += ["", f"Wall time: {self.wall_seconds / 60:.1f} min"]
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": dataclasses.asdict(self.config),
            "budget": self.budget,
            "rows": [dataclasses.asdict(row) for row in self.rows],
            "zero_shot_gap_ndcg@10": self.zero_shot_gap(),
            "wall_seconds": round(self.wall_seconds, 1),
        }


def sentence_transformers_reference(
    model_name: str,
    collection: BeirCollection,
    split: str,
    max_length: int,
    batch_size: int,
    top_k: int = 100,
) -> tuple[EvaluationResult, float]:
    """Score the model with sentence-transformers' own ``encode`` (defaults: float32) + exact search."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(resolve_backbone(model_name), device="cpu")
    model.max_seq_length = max_length
    qrels = collection.split_qrels(split)
    query_ids = sorted(q for q in qrels if q in collection.queries)
    doc_ids = list(collection.corpus)
    started = time.perf_counter()
    doc_embeddings = model.encode(
        [collection.corpus[d].full_text for d in doc_ids], batch_size=batch_size, show_progress_bar=True
    )
    query_embeddings = model.encode([collection.queries[q] for q in query_ids], batch_size=batch_size)
    scores = query_embeddings @ doc_embeddings.T
    top = np.argsort(-scores, axis=1)[:, :top_k]
    run = {q: {doc_ids[j]: float(scores[i, j]) for j in top[i]} for i, q in enumerate(query_ids)}
    seconds = time.perf_counter() - started
    return evaluate_run(qrels, run, metrics=TABLE_METRICS), seconds


def run_demo(
    config: DemoConfig, show_progress: bool = True, command: Sequence[str] | None = None
) -> DemoReport:
    """Run (or resume) the demo and write ``demo.md``, ``demo.json`` and ``demo_config.json``."""
    started = time.perf_counter()
    output = Path(config.output)
    saved_config = output / "demo_config.json"
    if saved_config.exists() and read_json(saved_config)["config"] != dataclasses.asdict(config):
        raise UsageError(
            f"{output} holds a demo run with other settings ({saved_config}); pass another --output"
        )
    write_json(
        saved_config,
        {
            "config": dataclasses.asdict(config),
            "command": list(command or sys.argv),
            "sbmoe_version": __version__,
        },
    )
    collection = load_collection(resolve_data(config.data))
    report = DemoReport(config=config)
    model_config, train_config = _demo_configs(config)
    report.budget = {
        "epochs": config.epochs,
        "batch": config.batch_size,
        "max length (query/doc)": f"{config.max_query_length}/{config.max_doc_length}",
        "precision": resolve_precision(config.precision, "cpu"),
        "checkpoint": config.checkpoint_selection,
        "dev docs": config.dev_max_docs or "all",
        "seed": config.seed,
    }
    evaluate = EvaluateConfig(split=config.split, precision=config.precision)
    # Models that share a backbone (the zero-shot model and both models before training; a trained
    # model at its last dev evaluation and at test) share pooled corpus embeddings through it.
    cache = EmbeddingCache(output / "cache")

    if config.reference:
        report.rows.append(_reference_row(config, collection, output / "reference-st"))
    zero_shot = Retriever.from_config(dataclasses.replace(model_config, num_experts=0))
    report.rows += _evaluated_rows(
        "zero-shot (sbmoe)", zero_shot, collection, output / "zero-shot", evaluate, cache
    )

    for name, experts in (("fine-tuned", 0), ("sb-moe", config.num_experts)):
        run_dir = output / name
        result = train(
            dataclasses.replace(model_config, num_experts=experts),
            train_config,
            collection,
            run_dir / "model",
            show_progress=show_progress,
            command=command,
            cache=cache,
        )
        trained = Retriever.load(str(run_dir / "model"))
        if experts == 0:
            label, rules = "fine-tuned baseline", evaluate
        else:
            label = f"SB-MoE {config.gating} gating, {experts} experts"
            rules = dataclasses.replace(evaluate, expert_poolings=["top1", "all"])
        report.rows += _evaluated_rows(
            label, trained, collection, run_dir / "test", rules, cache, result.seconds
        )
    report.wall_seconds = time.perf_counter() - started
    (output / "demo.md").write_text(report.markdown(), encoding="utf-8")
    write_json(output / "demo.json", report.to_dict())
    return report


def _demo_configs(config: DemoConfig) -> tuple[ModelConfig, TrainConfig]:
    return build_configs(
        "default",
        {
            "backbone": config.model,
            "num_experts": config.num_experts,
            "gating": config.gating,
            "max_query_length": config.max_query_length,
            "max_doc_length": config.max_doc_length,
        },
        {
            "epochs": config.epochs,
            "batch_size": config.batch_size,
            "dev_max_docs": config.dev_max_docs,
            "precision": config.precision,
            "seed": config.seed,
            "checkpoint_selection": config.checkpoint_selection,
        },
    )


def _reference_row(config: DemoConfig, collection: BeirCollection, directory: Path) -> DemoRow:
    system = "zero-shot (sentence-transformers encode)"
    cached = _cached_row(system, directory)
    if cached is not None:
        return cached
    result, seconds = sentence_transformers_reference(
        config.model, collection, config.split, config.max_doc_length, batch_size=64
    )
    save_metrics(result, directory, extra={"seconds": round(seconds, 2)})
    return DemoRow(system, result.metrics, None, seconds, str(directory))


def _evaluated_rows(
    label: str,
    retriever: Retriever,
    collection: BeirCollection,
    directory: Path,
    evaluate: EvaluateConfig,
    cache: EmbeddingCache,
    train_seconds: float | None = None,
) -> list[DemoRow]:
    """Evaluate a model (or reuse a finished evaluation): one row per inference rule."""
    rules = evaluate.expert_poolings
    dirs = {rule: directory / rule for rule in rules} if len(rules) > 1 else {label: directory}
    rows = [_cached_row(label if len(dirs) == 1 else f"{label}, {rule}", d) for rule, d in dirs.items()]
    if any(row is None for row in rows):
        outputs = evaluate_model(retriever, collection, directory, evaluate, cache=cache)
        rows = [
            DemoRow(
                label if len(outputs) == 1 else f"{label}, {out.name}",
                out.result.metrics,
                None,
                out.seconds,
                str(out.output_dir),
            )
            for out in outputs
        ]
    for row in rows:
        row.train_seconds = train_seconds
    return rows


def _cached_row(system: str, directory: Path) -> DemoRow | None:
    metrics_file = directory / "metrics.json"
    if not metrics_file.exists():
        return None
    saved = read_json(metrics_file)
    seconds = saved.get("seconds")
    if seconds is None and (directory / "config.json").exists():
        seconds = read_json(directory / "config.json").get("encode_and_search_seconds", 0.0)
    return DemoRow(system, {m: saved[m] for m in TABLE_METRICS}, None, seconds or 0.0, str(directory))
