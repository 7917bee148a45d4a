"""The finished cells of an experiment read back as systems: per-seed metrics and per-query scores.

A system is one (backbone, training collection, evaluation collection, variant, experts, inference
rule); its seeds are merged. :func:`system_kind` says which kind of row of a report it is.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.core.choices import PAPER_METRICS, PRIOR_CONTROLS
from sbmoe.core.errors import UsageError
from sbmoe.core.io import read_json
from sbmoe.core.layouts import EVALUATION_FILES, EXPERIMENT_FILES
from sbmoe.evaluation.metrics import read_query_groups
from sbmoe.evaluation.query_groups import restrict
from sbmoe.evaluation.statistics import mean_std
from sbmoe.study.grid import eval_dir, iter_finished_cells

# Rows run from the untrained model to the method: what a reader compares each system with comes
# above it. A control isolates what the mixture adds: an MoE-shaped model without the mixture (one
# expert, a fixed random gate, a linear adapter head) or a document-prior control.
KINDS = ("zero-shot", "baseline", "control", "sb-moe")
RULES = ("model", "top1", "topk", "all")


@dataclass
class SystemResult:
    """One system of one group: per-seed metrics and per-query scores."""

    backbone: str
    train_collection: str
    eval_collection: str
    variant: str
    experts: int
    rule: str
    kind: str = "sb-moe"
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    per_query: dict[str, list[dict[str, float]]] = field(default_factory=lambda: defaultdict(list))
    routing: list[dict[str, Any]] = field(default_factory=list)
    cell_dirs: list[str] = field(default_factory=list)
    eval_dirs: list[str] = field(default_factory=list)
    train_seconds: list[float] = field(default_factory=list)
    eval_seconds: list[float] = field(default_factory=list)
    # Seen / partly-seen / unseen query ids of the evaluation (None: no training split to tell).
    query_groups: dict[str, list[str]] | None = None
    # Whether deploying it means encoding the corpus again: its documents are not the untrained
    # backbone's (a head on the document side, or a fine-tuned backbone).
    reindexes: bool = False

    @property
    def group(self) -> tuple[str, str, str]:
        return self.backbone, self.train_collection, self.eval_collection

    @property
    def transfer_label(self) -> str:
        """The label with the training collection, unique among a backbone's systems."""
        return f"{self.label} ({self.train_collection})"

    @property
    def label(self) -> str:
        parts = [self.variant]
        if self.experts:
            parts.append(f"N={self.experts}")
        if self.rule not in ("model", ""):
            parts.append(self.rule)
        return " ".join(parts)

    def mean(self, metric: str) -> float:
        return mean_std(self.metrics[metric])[0]

    def std(self, metric: str) -> float:
        return mean_std(self.metrics[metric])[1]

    def mean_per_query(self, metric: str) -> dict[str, float]:
        """Per-query score averaged over the seeds that scored the query."""
        scores: dict[str, list[float]] = defaultdict(list)
        for run in self.per_query[metric]:
            for query_id, value in run.items():
                scores[query_id].append(value)
        return {q: sum(v) / len(v) for q, v in scores.items()}

    def group_mean_std(self, metric: str, query_ids: list[str]) -> tuple[float, float]:
        """Mean and standard deviation over seeds of the metric's mean over ``query_ids``."""
        per_seed = []
        for run in self.per_query[metric]:
            scores = restrict(run, query_ids)
            if scores:
                per_seed.append(float(np.mean(list(scores.values()))))
        return mean_std(per_seed)


def system_kind(cell: dict[str, Any], model_config: dict[str, Any] | None = None) -> str:
    """Which kind of row a cell's systems are: one of :data:`KINDS`.

    A cell with a ``control`` (a document-prior control) is a control; otherwise an untrained cell
    is zero-shot. A trained model is a control when its head is a linear adapter, a single expert
    or a fixed random gate; a baseline when it has no head; SB-MoE otherwise.

    Args:
        cell: The cell as ``done.json`` records it.
        model_config: The cell's resolved model settings (``cell.json``), when saved; the grid's
            shared settings (e.g. a random gate for every variant) are only there.
    """
    if cell.get("control"):
        return "control"
    if cell.get("trains") is False:
        return "zero-shot"
    config = model_config or cell.get("model") or {}
    experts = config.get("num_experts", cell["experts"])
    if config.get("head") == "linear" or experts == 1 or config.get("gating") == "random":
        return "control"
    return "sb-moe" if experts else "baseline"


def changes_documents(cell: dict[str, Any], model_config: dict[str, Any] | None = None) -> bool:
    """Whether a cell's document embeddings differ from the untrained backbone's (see :func:`system_kind`).

    Untrained cells and controls keep the backbone's documents (a Procrustes map is query-side); a
    trained model changes them unless its head sits on the query side only.
    """
    if cell.get("control") or cell.get("trains") is False:
        return False
    config = model_config or cell.get("model") or {}
    return config.get("head_side", "both") != "query"


def collect_results(
    output_dir: str | Path,
    metrics: tuple[str, ...] = PAPER_METRICS,
    cell_ids: Collection[str] | None = None,
) -> list[SystemResult]:
    """Gather the finished cells' evaluations into systems (seeds merged).

    Args:
        output_dir: An experiment's output directory.
        metrics: The metrics to read.
        cell_ids: Only these cells (default: every finished cell).
    """
    systems: dict[tuple, SystemResult] = {}
    for folder, done in iter_finished_cells(output_dir):
        if cell_ids is not None and folder.name not in cell_ids:
            continue
        cell = done["cell"]
        saved = read_json(folder / EXPERIMENT_FILES.cell) if (folder / EXPERIMENT_FILES.cell).exists() else {}
        kind = system_kind(cell, saved.get("model_config"))
        reindexes = changes_documents(cell, saved.get("model_config"))
        training = done.get("training") or {}
        for eval_name, rules in done["evaluations"].items():
            if cell.get("control") in PRIOR_CONTROLS and eval_name != cell["collection"]:
                continue  # a prior is its evaluated collection's own, not carried over (older runs)
            for rule in rules:
                directory = eval_dir(folder, eval_name) / (rule if len(rules) > 1 else "")
                key = (
                    cell["backbone"],
                    cell["collection"],
                    eval_name,
                    cell["variant"],
                    cell["experts"],
                    rule,
                )
                system = systems.setdefault(key, SystemResult(*key, kind=kind, reindexes=reindexes))
                if system.query_groups is None:
                    system.query_groups = read_query_groups(directory)
                scores, per_query = (
                    _read_mapping(directory / name)
                    for name in (EVALUATION_FILES.metrics, EVALUATION_FILES.per_query)
                )
                system.seeds.append(cell["seed"])
                system.cell_dirs.append(str(folder))
                system.eval_dirs.append(str(directory))
                for metric in metrics:
                    if not (
                        isinstance(scores.get(metric), float | int)
                        and isinstance(per_query.get(metric), dict)
                    ):
                        raise UsageError(
                            f"{directory}: metrics.json or per_query.json holds no {metric} scores"
                        )
                    system.metrics[metric].append(scores[metric])
                    system.per_query[metric].append(per_query[metric])
                if "seconds" in training:
                    system.train_seconds.append(training["seconds"])
                if eval_name in done.get("eval_seconds", {}):
                    system.eval_seconds.append(done["eval_seconds"][eval_name])
                routing_file = eval_dir(folder, eval_name) / EXPERIMENT_FILES.routing
                if routing_file.exists():
                    system.routing.append(read_json(routing_file))
    return list(systems.values())


def _read_mapping(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``, or a UsageError naming the file (before: a traceback)."""
    try:
        data = read_json(path)
    except (OSError, ValueError) as error:
        raise UsageError(f"{path}: unreadable ({error})") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data
