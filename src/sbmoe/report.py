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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.errors import UsageError
from sbmoe.evaluation import PAPER_METRICS
from sbmoe.experiments import iter_finished_cells, slug
from sbmoe.io import atomic_open, read_json, write_json
from sbmoe.statistics import ComparisonReport, compare_to_baseline, mean_std


@dataclass
class SystemResult:
    """One system of one group: per-seed metrics and per-query scores."""

    backbone: str
    train_collection: str
    eval_collection: str
    variant: str
    experts: int
    rule: str
    seeds: list[int] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    per_query: dict[str, list[dict[str, float]]] = field(default_factory=lambda: defaultdict(list))
    routing: list[dict[str, Any]] = field(default_factory=list)
    cell_dirs: list[str] = field(default_factory=list)
    eval_dirs: list[str] = field(default_factory=list)

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


def collect_results(output_dir: str | Path, metrics: tuple[str, ...] = PAPER_METRICS) -> list[SystemResult]:
    """Gather every finished cell's evaluations into systems (seeds merged)."""
    systems: dict[tuple, SystemResult] = {}
    for folder, done in iter_finished_cells(output_dir):
        cell = done["cell"]
        for eval_name, rules in done["evaluations"].items():
            for rule in rules:
                directory = folder / "eval" / eval_name / (rule if len(rules) > 1 else "")
                key = (
                    cell["backbone"],
                    cell["collection"],
                    eval_name,
                    cell["variant"],
                    cell["experts"],
                    rule,
                )
                system = systems.setdefault(key, SystemResult(*key))
                saved = read_json(directory / "metrics.json")
                per_query = read_json(directory / "per_query.json")
                system.seeds.append(cell["seed"])
                system.cell_dirs.append(str(folder))
                system.eval_dirs.append(str(directory))
                for metric in metrics:
                    system.metrics[metric].append(saved[metric])
                    system.per_query[metric].append(per_query[metric])
                routing_file = folder / "eval" / eval_name / "routing.json"
                if routing_file.exists():
                    system.routing.append(read_json(routing_file))
    return list(systems.values())


@dataclass
class ExperimentReport:
    """Systems grouped for tables, with one significance report per group."""

    systems: list[SystemResult]
    comparisons: dict[tuple[str, str, str], ComparisonReport]
    metrics: tuple[str, ...]
    baseline: str
    primary_metric: str

    def groups(self) -> dict[tuple[str, str, str], list[SystemResult]]:
        grouped: dict[tuple[str, str, str], list[SystemResult]] = defaultdict(list)
        for system in self.systems:
            grouped[system.group].append(system)
        for members in grouped.values():
            members.sort(key=lambda s: (s.variant != self.baseline, s.variant, s.experts, s.rule))
        return dict(grouped)

    def _significant(self, group: tuple[str, str, str], system: SystemResult) -> bool:
        report = self.comparisons.get(group)
        if report is None:
            return False
        return any(c.system == system.label and c.significant for c in report.comparisons)

    def _cells(self, group, system: SystemResult, best: dict[str, float], bold, dagger) -> list[str]:
        cells = []
        for metric in self.metrics:
            mean, std = system.mean(metric), system.std(metric)
            text = f"{mean:.4f}" + (f" ± {std:.4f}" if len(system.seeds) > 1 else "")
            if math.isclose(mean, best[metric], abs_tol=5e-5):
                text = bold(text)
            if metric == self.primary_metric and self._significant(group, system):
                text += dagger
            cells.append(text)
        return cells

    def markdown(self) -> str:
        lines = []
        for group, members in self.groups().items():
            best = {m: max(s.mean(m) for s in members) for m in self.metrics}
            backbone, trained_on, evaluated_on = group
            title = (
                f"### {backbone}: trained on {trained_on}, evaluated on {evaluated_on} ({_test_note(self)})"
            )
            lines += [
                title,
                "",
                "| system | seeds | " + " | ".join(self.metrics) + " |",
                "|---|---:|" + "---:|" * len(self.metrics),
            ]
            for system in members:
                cells = self._cells(group, system, best, lambda t: f"**{t}**", " †")
                lines.append(f"| {system.label} | {len(system.seeds)} | " + " | ".join(cells) + " |")
            lines.append("")
        lines.append(
            f"Mean ± standard deviation over seeds; best per column in bold; † = {self.primary_metric} "
            f"significantly different from `{self.baseline}` (paired test on per-query scores averaged "
            "over seeds, Bonferroni-corrected within the table)."
        )
        return "\n".join(lines) + "\n"

    def latex(self) -> str:
        blocks = []
        for group, members in self.groups().items():
            best = {m: max(s.mean(m) for s in members) for m in self.metrics}
            header = " & ".join(["System", "Seeds", *(_latex_escape(m) for m in self.metrics)])
            rows = [
                " & ".join(
                    [
                        _latex_escape(s.label),
                        str(len(s.seeds)),
                        *(
                            c.replace("±", r"$\pm$")
                            for c in self._cells(group, s, best, lambda t: rf"\textbf{{{t}}}", r"$^\dagger$")
                        ),
                    ]
                )
                + r" \\"
                for s in members
            ]
            caption = _latex_escape(f"{group[0]}: trained on {group[1]}, evaluated on {group[2]}")
            blocks.append(
                "\n".join(
                    [
                        r"\begin{table}[t]",
                        r"\centering",
                        rf"\caption{{{caption}}}",
                        r"\begin{tabular}{l" + "r" * (len(self.metrics) + 1) + "}",
                        r"\toprule",
                        header + r" \\",
                        r"\midrule",
                        *rows,
                        r"\bottomrule",
                        r"\end{tabular}",
                        r"\end{table}",
                    ]
                )
            )
        return "\n\n".join(blocks) + "\n"

    def to_dict(self) -> dict[str, Any]:
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


def _test_note(report: ExperimentReport) -> str:
    tests = {c.test for c in report.comparisons.values()}
    return f"significance: {', '.join(sorted(tests)) or 'none'}"


def _latex_escape(text: str) -> str:
    for char, escaped in (
        ("\\", r"\textbackslash{}"),
        ("_", r"\_"),
        ("&", r"\&"),
        ("%", r"\%"),
        ("#", r"\#"),
        ("@", "@"),
    ):
        text = text.replace(char, escaped)
    return text


def build_report(
    output_dir: str | Path,
    baseline: str = "fine-tuned",
    metric: str = "ndcg@10",
    test: str = "t-test",
    alpha: float = 0.05,
    seed: int = 42,
    metrics: tuple[str, ...] = PAPER_METRICS,
) -> ExperimentReport:
    """Collect the finished cells of ``output_dir`` and test each system against ``baseline``."""
    systems = collect_results(output_dir, metrics)
    if not systems:
        raise UsageError(f"{output_dir}: no finished cells (cells/*/done.json) to report on")
    report = ExperimentReport(systems, {}, metrics, baseline, metric)
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
    written = []
    for name, text in (("tables.md", report.markdown()), ("tables.tex", report.latex())):
        with atomic_open(directory / name) as handle:
            handle.write(text)
        written.append(directory / name)
    write_json(directory / "results.json", report.to_dict())
    written.append(directory / "results.json")
    if not plots:
        return written
    from sbmoe.plots import plot_expert_usage, plot_metric_vs_experts

    written += [
        path
        for path in (
            plot_metric_vs_experts(report, directory / "metric_vs_experts.png"),
            plot_expert_usage(report, directory / "expert_usage.png"),
        )
        if path
    ]
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
