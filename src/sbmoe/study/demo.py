"""The demo: zero-shot vs fine-tuned vs SB-MoE on one collection, in one table.

The demo is a built-in experiment grid (:data:`DEMO_GRID`) run by
:func:`sbmoe.study.experiments.run_experiment`, so a second run reuses the finished cells. Beside the grid,
sentence-transformers' own ``encode`` + exact search scores the backbone: the reference the
zero-shot row must match.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sbmoe.config.jobs import JobOptions, ReportConfig
from sbmoe.config.provenance import provenance
from sbmoe.core.choices import PAPER_METRICS
from sbmoe.core.errors import SbmoeError
from sbmoe.core.io import read_json
from sbmoe.core.layouts import EVALUATION_FILES
from sbmoe.core.runtime import resolve_device, resolve_inference, resolve_precision
from sbmoe.data.beir import BeirCollection, load_collection, resolve_data
from sbmoe.evaluation.metrics import EvaluationResult, evaluate_run, save_metrics
from sbmoe.evaluation.tables import Cell, Report, Row
from sbmoe.model.backbones import load_sentence_transformer, resolve_backbone
from sbmoe.study.experiments import run_experiment
from sbmoe.study.grid import ExperimentGrid, cell_configs, check_grid, expand, save_grid
from sbmoe.study.report import build_report

REFERENCE = "zero-shot (sentence-transformers encode)"

# Fits 15 minutes on a 2-core CPU. Both trained systems keep their last checkpoint: with one
# epoch the only choice `best` has is the starting model versus the trained one, and SciFact's dev
# slice (81 held-out training queries) is too small to make that choice reliably. Dev nDCG@10 is
# still logged.
DEMO_GRID = ExperimentGrid(
    name="demo",
    backbones=["all-MiniLM-L6-v2"],
    collections=["scifact"],
    variants={
        "zero-shot": {"num_experts": 0, "train": False},
        "fine-tuned": {"num_experts": 0},
        "sb-moe": {},
    },
    experts=[6],
    seeds=[42],
    # 128-token documents (the backbone takes 256): the demo then fits 15 minutes on 2 AVX2-only
    # cores too; the README says what it costs (sbmoe demo --max-doc-length 256 for the full length).
    model={"gating": "learned", "max_query_length": 64, "max_doc_length": 128},
    train={"epochs": 1, "batch_size": 32, "checkpoint_selection": "last"},
    evaluate={"split": "test", "expert_poolings": ["top1", "all"]},
)


def demo_grid(
    model_overrides: dict[str, Any], train_overrides: dict[str, Any], data: str | None = None
) -> ExperimentGrid:
    """:data:`DEMO_GRID` with settings replaced: ``backbone``, ``num_experts`` and ``seed`` set
    their axes, other keys the shared model and training settings; ``None`` values are skipped.

    Raises:
        UsageError: An override that is no ModelConfig or TrainConfig field.
    """
    grid = copy.deepcopy(DEMO_GRID)
    model = {k: v for k, v in model_overrides.items() if v is not None}
    train = {k: v for k, v in train_overrides.items() if v is not None}
    if "backbone" in model:
        grid.backbones = [model.pop("backbone")]
    if "num_experts" in model:
        grid.experts = [model.pop("num_experts")]
    if "seed" in train:
        grid.seeds = [train.pop("seed")]
    if data is not None:
        grid.collections = [data]
    grid.model.update(model)
    grid.train.update(train)
    return check_grid(grid.to_dict(), "demo settings")


def run_demo(
    output: str | Path,
    model_overrides: dict[str, Any],
    train_overrides: dict[str, Any],
    *,
    data: str | None = None,
    reference: bool = True,
    options: JobOptions | None = None,
) -> Report:
    """Run (or resume) the demo grid under ``output`` and write its table.

    Writes ``grid.yaml`` (the grid run, for ``sbmoe experiment``), the experiment's cells, and the
    table as ``demo.md`` and ``demo.json``.

    Args:
        output: Results directory.
        model_overrides: ModelConfig fields (``backbone``: the model) replacing the demo's.
        train_overrides: TrainConfig fields replacing the demo's.
        data: Collection name or BEIR folder (default: SciFact).
        reference: Also score the backbone with sentence-transformers' own ``encode``.
        options: Progress bars and the command line recorded with the results (see
            :func:`~sbmoe.study.experiments.run_experiment`).

    Raises:
        UsageError: Unknown override, or ``output`` holds finished cells run with other settings.
        SbmoeError: A cell failed (its ``error.json`` holds the traceback).
    """
    started = time.perf_counter()
    output = Path(output)
    grid = demo_grid(model_overrides, train_overrides, data)
    options = options or JobOptions()
    summary = run_experiment(grid, output, options)
    save_grid(grid, output / "grid.yaml")
    if summary.failed:
        cell_id, error = next(iter(summary.failed.items()))
        raise SbmoeError(
            f"demo cell {cell_id} failed: {error} (traceback in {output}/cells/{cell_id}/error.json)"
        )

    cells = expand(grid)
    baseline = ReportConfig(baseline="fine-tuned")
    experiment = build_report(output, baseline, cell_ids={c.cell_id for c in cells})
    report = experiment.to_report(timing=True)
    table = report.tables[0]
    # Its seen / unseen queries (on collections with a train split): gains on seen ones only are
    # gains from learning the documents.
    seen = [t for t in report.tables[1:2] if t.label == f"{table.label}-seen"]
    model, train = cell_configs(grid, next(c for c in cells if c.variant == "sb-moe"))
    split = grid.evaluate["split"]
    table.caption = f"{grid.collections[0]} ({split}), backbone {grid.backbones[0]}"
    table.label = "tab:demo"
    for extra in seen:
        extra.label = "tab:demo-seen"
    data_out: dict[str, Any] = {"grid": grid.to_dict(), "experiment": report.data}
    if reference:
        collection = load_collection(resolve_data(grid.collections[0]))
        metrics, seconds = _reference(model.backbone, collection, split, model.max_doc_length, output)
        cells = {m: Cell(metrics[m]) for m in PAPER_METRICS}
        cells.update(train_seconds=Cell("—"), eval_seconds=Cell(seconds), reindexes=Cell("no"))
        table.rows.insert(0, Row(REFERENCE, cells))
        zero_shot = next(s for s in experiment.systems if s.variant == "zero-shot")
        data_out["zero_shot_gap_ndcg@10"] = zero_shot.mean("ndcg@10") - metrics["ndcg@10"]
    device = resolve_device("auto")
    budget = {
        "epochs": train.epochs,
        "batch": train.batch_size,
        "max length (query/doc)": f"{model.max_query_length}/{model.max_doc_length}",
        "training precision": resolve_precision(train.precision, device),
        "encoding": "{0.backend} {0.precision}".format(resolve_inference("auto", train.precision, device)),
        "checkpoint": train.checkpoint_selection,
        "dev docs": train.dev_max_docs or "all",
        "seed": train.seed,
    }
    wall_seconds = time.perf_counter() - started
    notes = [
        "Budget: " + ", ".join(f"{k} {v}" for k, v in budget.items()) + ".",
        "train s includes the dev evaluations; a trained model's last dev evaluation encodes the corpus, "
        "and its test evaluation reuses those embeddings through the cache.",
    ]
    if "zero_shot_gap_ndcg@10" in data_out:
        notes.append(
            f"Zero-shot nDCG@10, sbmoe minus sentence-transformers: {data_out['zero_shot_gap_ndcg@10']:+.4f}."
        )
    notes.append(f"Wall time: {wall_seconds / 60:.1f} min.")
    data_out.update(
        budget=budget,
        summary=dataclasses.asdict(summary),
        wall_seconds=round(wall_seconds, 1),
        provenance=provenance(options.command),
    )
    demo = Report([table, *seen], [*report.notes, *notes], data_out)
    demo.save(output / "demo.md")
    demo.save(output / "demo.json")
    return demo


def sentence_transformers_reference(
    model_name: str,
    collection: BeirCollection,
    split: str,
    max_length: int,
    batch_size: int,
    top_k: int = 100,
) -> tuple[EvaluationResult, float]:
    """Score the model with sentence-transformers' own ``encode`` (defaults: float32) + exact search."""
    # sbmoe's loader: a local folder gets the same checks (no code of its own) as every other load.
    model = load_sentence_transformer(model_name, resolve_backbone(model_name), torch.device("cpu"))
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
    return evaluate_run(qrels, run, metrics=PAPER_METRICS), seconds


def _reference(
    backbone: str, collection: BeirCollection, split: str, max_length: int, output: Path
) -> tuple[dict[str, float], float]:
    """Metrics and seconds of the sentence-transformers reference; reused from ``output`` when it
    was made with the same settings."""
    directory = output / "reference-st"
    settings = {
        "backbone": backbone,
        "collection": str(collection.root),
        "split": split,
        "max_length": max_length,
    }
    metrics_file = directory / EVALUATION_FILES.metrics
    if metrics_file.exists():
        saved = read_json(metrics_file)
        if saved.get("settings") == settings:
            return {m: saved[m] for m in PAPER_METRICS}, saved["seconds"]
    result, seconds = sentence_transformers_reference(backbone, collection, split, max_length, batch_size=64)
    save_metrics(result, directory, extra={"seconds": round(seconds, 2), "settings": settings})
    return result.metrics, seconds
