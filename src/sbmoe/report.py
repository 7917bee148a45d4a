"""Reports over finished experiment cells: tables (Markdown, LaTeX), significance, plots, results.json.

Systems are grouped by (backbone, training collection, evaluation collection); within a group a
system is a (variant, experts, inference rule) and its numbers are the mean and standard deviation
over seeds. Every system is tested against the baseline variant of its group on per-query scores
averaged over seeds (paired), Bonferroni-corrected over the comparisons of the group.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.errors import UsageError
from sbmoe.evaluation import PAPER_METRICS
from sbmoe.experiments import eval_dir, iter_finished_cells, slug
from sbmoe.io import read_json
from sbmoe.statistics import ComparisonReport, compare_to_baseline, mean_std
from sbmoe.tables import Cell, Column, Report, Row, Table, metric_label

# Rows run from the untrained model to the method: what a reader compares each system with comes
# above it. A control is an MoE-shaped model without the mixture (one expert, or a fixed random gate).
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

    @property
    def group(self) -> tuple[str, str, str]:
        return self.backbone, self.train_collection, self.eval_collection

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


def system_kind(cell: dict[str, Any], model_config: dict[str, Any] | None = None) -> str:
    """Which kind of row a cell's systems are: one of :data:`KINDS`.

    Args:
        cell: The cell as ``done.json`` records it.
        model_config: The cell's resolved model settings (``cell.json``), when saved; the grid's
            shared settings (e.g. a random gate for every variant) are only there.
    """
    if cell.get("trains") is False:
        return "zero-shot"
    if not cell["experts"]:
        return "baseline"
    gating = (model_config or cell.get("model") or {}).get("gating")
    return "control" if cell["experts"] == 1 or gating == "random" else "sb-moe"


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
        saved = read_json(folder / "cell.json") if (folder / "cell.json").exists() else {}
        kind = system_kind(cell, saved.get("model_config"))
        training = done.get("training") or {}
        for eval_name, rules in done["evaluations"].items():
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
                system = systems.setdefault(key, SystemResult(*key, kind=kind))
                scores = read_json(directory / "metrics.json")
                per_query = read_json(directory / "per_query.json")
                system.seeds.append(cell["seed"])
                system.cell_dirs.append(str(folder))
                system.eval_dirs.append(str(directory))
                for metric in metrics:
                    system.metrics[metric].append(scores[metric])
                    system.per_query[metric].append(per_query[metric])
                if "seconds" in training:
                    system.train_seconds.append(training["seconds"])
                if eval_name in done.get("eval_seconds", {}):
                    system.eval_seconds.append(done["eval_seconds"][eval_name])
                routing_file = eval_dir(folder, eval_name) / "routing.json"
                if routing_file.exists():
                    system.routing.append(read_json(routing_file))
    return list(systems.values())


@dataclass
class ExperimentReport:
    """Systems grouped for tables, with one significance report per group.

    Attributes:
        variant_order: Variant names in the grid's order (rows of a kind follow it; variants not
            in it come after, by name).
    """

    systems: list[SystemResult]
    comparisons: dict[tuple[str, str, str], ComparisonReport]
    metrics: tuple[str, ...]
    baseline: str
    primary_metric: str
    variant_order: list[str] = field(default_factory=list)

    def groups(self) -> dict[tuple[str, str, str], list[SystemResult]]:
        """Systems per (backbone, training, evaluation collection), zero-shot first, SB-MoE last."""
        grouped: dict[tuple[str, str, str], list[SystemResult]] = defaultdict(list)
        for system in self.systems:
            grouped[system.group].append(system)
        for members in grouped.values():
            members.sort(key=self._row_order)
        return dict(grouped)

    def _row_order(self, system: SystemResult) -> tuple:
        variant = system.variant
        position = (
            self.variant_order.index(variant) if variant in self.variant_order else len(self.variant_order)
        )
        rule = RULES.index(system.rule) if system.rule in RULES else len(RULES)
        kind = KINDS.index(system.kind) if system.kind in KINDS else len(KINDS)
        return kind, variant != self.baseline, position, variant, system.experts, rule

    def to_report(self, timing: bool = False) -> Report:
        """One table per group (mean ± std over seeds, best in bold, † significant against the
        baseline, its corrected p-value), with ``to_dict`` giving :meth:`to_dict`.

        Args:
            timing: Add columns with the mean training and evaluation seconds.
        """
        tables = [self._table(group, members, timing) for group, members in self.groups().items()]
        tests = sorted({c.test for c in self.comparisons.values()})
        metric = metric_label(self.primary_metric)
        spread = (
            "Mean ± standard deviation over seeds; " if any(len(s.seeds) > 1 for s in self.systems) else ""
        )
        if tests:
            legend = (
                f"{spread}best per column in bold; † = {metric} significantly different from "
                f"{self.baseline} ({', '.join(tests)} on per-query scores averaged over seeds, "
                "Bonferroni-corrected within the table); p = that corrected p-value."
            )
        else:
            legend = f"{spread}best per column in bold; no {self.baseline} to test against."
        legend = legend[0].upper() + legend[1:]
        return Report(tables, [legend], self.to_dict())

    def _table(self, group: tuple[str, str, str], members: list[SystemResult], timing: bool) -> Table:
        backbone, trained_on, evaluated_on = group
        seed_counts = {len(s.seeds) for s in members}
        columns = [Column("seeds", "seeds")] if len(seed_counts) > 1 else []
        columns += [Column(m, metric_label(m)) for m in self.metrics]
        comparison = self.comparisons.get(group)
        if comparison is not None:
            columns.append(Column("p", "p", style="p"))
        if timing:
            columns += [Column("train_seconds", "train s", 0), Column("eval_seconds", "eval s", 0)]
        best = {m: max(s.mean(m) for s in members) for m in self.metrics}
        table = Table(
            columns,
            caption=f"{backbone}: trained on {trained_on}, evaluated on {evaluated_on}",
            label="tab:" + slug(f"{backbone}-{trained_on}-{evaluated_on}").lower(),
        )
        if len(seed_counts) == 1:
            count = seed_counts.pop()
            table.notes.append(f"{count} seed{'s' if count > 1 else ''} per system.")
        for system in members:
            tested = None
            if comparison is not None and system.label != comparison.baseline:
                tested = comparison[system.label]
            cells = {"seeds": Cell(len(system.seeds))}
            for metric in self.metrics:
                mean = system.mean(metric)
                cells[metric] = Cell(
                    mean,
                    system.std(metric) if len(system.seeds) > 1 else None,
                    bold=math.isclose(mean, best[metric], abs_tol=5e-5),
                    dagger=metric == self.primary_metric and tested is not None and tested.significant,
                )
            if tested is not None:
                cells["p"] = Cell(tested.corrected_p_value)
            if timing:
                cells["train_seconds"] = Cell(
                    float(np.mean(system.train_seconds)) if system.train_seconds else "—"
                )
                cells["eval_seconds"] = Cell(
                    float(np.mean(system.eval_seconds)) if system.eval_seconds else None
                )
            table.rows.append(Row(system.label, cells))
        return table

    def to_dict(self) -> dict[str, Any]:
        """Every system's per-seed metrics, means and standard deviations, and the comparisons."""
        return {
            "baseline": self.baseline,
            "primary_metric": self.primary_metric,
            "systems": [
                {
                    **{
                        f.name: getattr(s, f.name)
                        for f in dataclasses.fields(s)
                        if f.name not in ("per_query", "metrics")
                    },
                    "label": s.label,
                    "metrics_per_seed": dict(s.metrics),
                    "mean": {m: s.mean(m) for m in self.metrics},
                    "std": {m: s.std(m) for m in self.metrics},
                }
                for s in self.systems
            ],
            "comparisons": {
                " / ".join(group): report.to_dict() for group, report in self.comparisons.items()
            },
        }


def build_report(
    output_dir: str | Path,
    baseline: str = "fine-tuned",
    metric: str = "ndcg@10",
    test: str = "t-test",
    alpha: float = 0.05,
    seed: int = 42,
    metrics: tuple[str, ...] = PAPER_METRICS,
    cell_ids: Collection[str] | None = None,
) -> ExperimentReport:
    """Collect the finished cells of ``output_dir`` and test each system against ``baseline``.

    Args:
        cell_ids: Only these cells (default: every finished cell).
    """
    systems = collect_results(output_dir, metrics, cell_ids)
    if not systems:
        raise UsageError(f"{output_dir}: no finished cells (cells/*/done.json) to report on")
    experiment = Path(output_dir) / "experiment.json"
    order = list(read_json(experiment)["grid"]["variants"]) if experiment.exists() else []
    report = ExperimentReport(systems, {}, metrics, baseline, metric, order)
    for group, members in report.groups().items():
        base = next((s for s in members if s.variant == baseline), None)
        others = [s for s in members if s is not base]
        if base is None or not others:
            continue
        per_query = {base.label: base.mean_per_query(metric)}
        per_query.update({s.label: s.mean_per_query(metric) for s in others})
        report.comparisons[group] = compare_to_baseline(
            per_query, base.label, test=test, alpha=alpha, seed=seed, metric=metric
        )
    return report


def write_report(report: ExperimentReport, directory: str | Path, plots: bool = True) -> list[Path]:
    """Write tables.md, tables.tex, results.json and (unless ``plots`` is off) the PNG plots."""
    directory = Path(directory)
    rendered = report.to_report()
    written = [rendered.save(directory / name) for name in ("tables.md", "tables.tex", "results.json")]
    if not plots:
        return written
    from sbmoe.plots import plot_expert_usage, plot_metric_vs_experts

    groups = report.groups()
    if any(s.experts for members in groups.values() for s in members):
        panels: dict[str, dict[str, list[tuple[int, float, float]]]] = {}
        references: dict[str, dict[str, float]] = {}
        metric = report.primary_metric
        for (backbone, _, evaluated_on), members in groups.items():
            title = f"{backbone} / {evaluated_on}"
            lines, flat = panels.setdefault(title, {}), references.setdefault(title, {})
            for s in members:
                if s.experts:
                    lines.setdefault(f"{s.variant} {s.rule}", []).append(
                        (s.experts, s.mean(metric), s.std(metric))
                    )
                else:
                    flat[s.label] = s.mean(metric)
        path = directory / "metric_vs_experts.png"
        written.append(
            plot_metric_vs_experts(panels, references, metric_label(metric), path, report.baseline)
        )
    # One panel per trained MoE model (its first seed's routing), on the collection it was trained on.
    routed = [s for s in report.systems if s.routing and s.train_collection == s.eval_collection]
    usage = {
        f"{s.backbone}, {s.eval_collection}: {s.variant} N={s.experts}": s.routing[0]
        for s in sorted(routed, key=lambda s: (s.eval_collection, s.variant, s.experts))
    }
    if usage:
        written.append(plot_expert_usage(usage, directory / "expert_usage.png"))
    for system in _tsne_systems(report):
        written.append(write_tsne(system, directory / f"tsne_{slug(system.eval_collection)}.png"))
    return written


def _tsne_systems(report: ExperimentReport) -> list[SystemResult]:
    """Per evaluation collection, the trained MoE system with the most experts (top1 rule preferred)."""
    chosen: dict[str, SystemResult] = {}
    for system in report.systems:
        trained = system.cell_dirs and (Path(system.cell_dirs[0]) / "model").exists()
        if not system.experts or not trained:
            continue
        current = chosen.get(system.eval_collection)
        rank = (system.experts, system.rule == "top1")
        if current is None or rank > (current.experts, current.rule == "top1"):
            chosen[system.eval_collection] = system
    return list(chosen.values())


def write_tsne(system: SystemResult, path: Path, top: int = 50) -> Path:
    """t-SNE of one test query and its top documents (first seed's model), coloured by expert."""
    import torch

    from sbmoe.data import load_collection, resolve_data
    from sbmoe.encoding import encode_texts
    from sbmoe.evaluation import read_trec_run
    from sbmoe.modeling import Retriever
    from sbmoe.plots import plot_tsne

    retriever = Retriever.load(str(Path(system.cell_dirs[0]) / "model"))
    if system.rule in ("top1", "topk", "all"):
        retriever.head.expert_pooling = system.rule
    collection = load_collection(resolve_data(system.eval_collection))
    run = read_trec_run(Path(system.eval_dirs[0]) / "run.trec")
    query_id = sorted(run)[0]
    doc_ids = sorted(run[query_id], key=lambda d: -run[query_id][d])[:top]
    texts = [collection.queries[query_id], *(collection.corpus[d].full_text for d in doc_ids)]
    pooled = np.concatenate(
        [
            encode_texts(retriever, texts[:1], "query", pooled_only=True),
            encode_texts(retriever, texts[1:], "document", pooled_only=True),
        ]
    )
    retriever.head.eval()
    with torch.inference_mode():
        out = retriever.head({"sentence_embedding": torch.from_numpy(pooled)})
    points = torch.nn.functional.normalize(out["sentence_embedding"], dim=-1).numpy()
    title = (
        f"{system.eval_collection}, query {query_id}: top {len(doc_ids)} documents "
        f"({system.variant}, N={system.experts}, {system.rule})"
    )
    return plot_tsne(points, out["expert_index"].numpy(), title, path)
