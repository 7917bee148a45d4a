"""Reports over finished experiment cells: tables (Markdown, LaTeX), significance, plots, results.json.

Systems are grouped by (backbone, training collection, evaluation collection); within a group a
system is a (variant, experts, inference rule) and its numbers are the mean and standard deviation
over seeds. Every system is tested against the baseline variant of its group on per-query scores
averaged over seeds (paired), Bonferroni-corrected over the comparisons of the group.

Two more views guard against gains that are not retrieval:

* Seen and unseen queries (:mod:`sbmoe.evaluation.query_groups`): where a collection's test queries share
  relevant documents with its training queries, each in-domain table is followed by one of the
  primary metric on the seen, partly-seen and unseen queries, tested against the baseline within
  each group.
* Transfer: per backbone, how far each system moved from the zero-shot backbone on every collection
  it was evaluated on, the ones it was not trained on included, tested against zero-shot.
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

from sbmoe.config.jobs import ReportConfig
from sbmoe.core.artifacts import REPORT, writing_output
from sbmoe.core.choices import PAPER_METRICS
from sbmoe.core.errors import UsageError
from sbmoe.core.io import read_json
from sbmoe.core.layouts import EXPERIMENT_FILES, REPORT_FILES
from sbmoe.evaluation.query_groups import GROUPS, restrict
from sbmoe.evaluation.statistics import Comparison, ComparisonReport, SignificanceTest, compare_to_baseline
from sbmoe.evaluation.tables import Cell, Column, Report, Row, Table, metric_label
from sbmoe.study.grid import slug
from sbmoe.study.results import KINDS, RULES, SystemResult, collect_results, system_kind

__all__ = [
    "ExperimentReport",
    "SystemResult",
    "build_report",
    "collect_results",
    "system_kind",
    "write_report",
]

# Label of the zero-shot reference in the transfer comparisons.
ZERO_SHOT = "zero-shot"


@dataclass
class ExperimentReport:
    """Systems grouped for tables, with significance reports per group, query group and transfer.

    Attributes:
        variant_order: Variant names in the grid's order (rows of a kind follow it; variants not
            in it come after, by name).
        group_comparisons: (group, query group) -> the group's systems against the baseline on the
            primary metric, on that query group's queries only.
        transfer: (backbone, evaluation collection) -> every system evaluated there against the
            zero-shot backbone on the primary metric (systems named by ``transfer_label``).
    """

    systems: list[SystemResult]
    comparisons: dict[tuple[str, str, str], ComparisonReport]
    metrics: tuple[str, ...]
    baseline: str
    primary_metric: str
    variant_order: list[str] = field(default_factory=list)
    group_comparisons: dict[tuple[tuple[str, str, str], str], ComparisonReport] = field(default_factory=dict)
    transfer: dict[tuple[str, str], ComparisonReport] = field(default_factory=dict)

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
        """Per group a table (mean ± std over seeds, best in bold, † significant against the
        baseline, its corrected p-value), followed by its seen/unseen table where there is one;
        then a transfer table per backbone whose systems were evaluated off their training
        collection. ``to_dict`` gives :meth:`to_dict`.

        Args:
            timing: Add columns with the mean training and evaluation seconds, and whether
                deploying the system re-encodes the corpus (:attr:`SystemResult.reindexes`).
        """
        tables = []
        for group, members in self.groups().items():
            tables.append(self._table(group, members, timing))
            query_groups = in_domain_query_groups(members)
            if query_groups:
                tables.append(self._query_group_table(group, members, query_groups))
        tables += [self._transfer_table(backbone) for backbone in self._transfer_backbones()]
        tests = sorted({c.test for c in self.comparisons.values()})
        metric = metric_label(self.primary_metric)
        spread = (
            "Mean ± standard deviation over seeds; " if any(len(s.seeds) > 1 for s in self.systems) else ""
        )
        if tests:
            legend = (
                f"{spread}best per column in bold. In the tables of every metric, † = {metric} "
                f"significantly different from {self.baseline} ({', '.join(tests)} on per-query scores "
                "averaged over seeds, Bonferroni-corrected within the table); p = that corrected p-value."
            )
        else:
            legend = f"{spread}best per column in bold; no {self.baseline} to test against."
        legend = legend[0].upper() + legend[1:]
        return Report(tables, [legend], self.to_dict())

    def _table(self, group: tuple[str, str, str], members: list[SystemResult], timing: bool) -> Table:
        seed_counts = {len(s.seeds) for s in members}
        columns = [Column("seeds", "seeds")] if len(seed_counts) > 1 else []
        columns += [Column(m, metric_label(m)) for m in self.metrics]
        comparison = self.comparisons.get(group)
        if comparison is not None:
            columns.append(Column("p", "p", style="p"))
        if timing:
            columns += [Column("train_seconds", "train s", 0), Column("eval_seconds", "eval s", 0)]
            columns.append(Column("reindexes", "re-encodes corpus"))
        best = {m: max(s.mean(m) for s in members) for m in self.metrics}
        table = Table(columns, caption=_caption(group), label=_table_label(group))
        if len(seed_counts) == 1:
            count = seed_counts.pop()
            table.notes.append(f"{count} seed{'s' if count > 1 else ''} per system.")
        for system in members:
            tested = self._tested(comparison, system)
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
                cells["reindexes"] = Cell("yes" if system.reindexes else "no")
            table.rows.append(Row(system.label, cells))
        return table

    def _query_group_table(
        self, group: tuple[str, str, str], members: list[SystemResult], query_groups: dict[str, list[str]]
    ) -> Table:
        """The primary metric on all, seen, partly-seen and unseen queries, each tested apart."""
        metric = self.primary_metric
        label = metric_label(metric)
        backbone, trained_on, _ = group
        subsets = {"all": sorted(members[0].mean_per_query(metric))}
        subsets.update((name, query_groups[name]) for name in GROUPS if query_groups.get(name))
        tests = {"all": self.comparisons.get(group)}
        tests.update((name, self.group_comparisons.get((group, name))) for name in GROUPS)
        columns = []
        for name, ids in subsets.items():
            columns.append(Column(name, f"{label} {name} (n={len(ids)})"))
            if tests[name] is not None:
                columns.append(Column(f"p {name}", "p", style="p"))
        table = Table(
            columns,
            caption=f"{backbone} trained on {trained_on}: {label} on queries whose relevant documents "
            "were all (seen), some (partly-seen) or none (unseen) training positives",
            label=_table_label(group) + "-seen",
        )
        table.notes.append(
            f"A training positive is a document relevant to a query of {trained_on}'s train split; "
            f"† and p: {label} against {self.baseline} on that column's queries only."
        )
        scores = {
            name: {s.label: s.group_mean_std(metric, ids) for s in members} for name, ids in subsets.items()
        }
        best = {name: max(mean for mean, _ in values.values()) for name, values in scores.items()}
        for system in members:
            cells = {}
            for name in subsets:
                mean, std = scores[name][system.label]
                tested = self._tested(tests[name], system)
                cells[name] = Cell(
                    mean,
                    std if len(system.seeds) > 1 else None,
                    bold=math.isclose(mean, best[name], abs_tol=5e-5),
                    dagger=tested is not None and tested.significant,
                )
                if tested is not None:
                    cells[f"p {name}"] = Cell(tested.corrected_p_value)
            table.rows.append(Row(system.label, cells))
        return table

    @staticmethod
    def _tested(comparison: ComparisonReport | None, system: SystemResult) -> Comparison | None:
        """The system's comparison in ``comparison``; None for the baseline itself or no test."""
        if comparison is None or system.label == comparison.baseline:
            return None
        return comparison[system.label]

    def _transfer_backbones(self) -> list[str]:
        """Backbones with a system evaluated off its training collection, against zero-shot there."""
        backbones = {
            s.backbone
            for s in self.systems
            if s.train_collection != s.eval_collection and (s.backbone, s.eval_collection) in self.transfer
        }
        return [b for b in dict.fromkeys(s.backbone for s in self.systems) if b in backbones]

    def _transfer_table(self, backbone: str) -> Table:
        """Δ of the primary metric from zero-shot: in-domain, then on every evaluated collection."""
        label = metric_label(self.primary_metric)
        evaluated = [c for (b, c) in self.transfer if b == backbone]
        columns = [Column("trained_on", "trained on"), Column("in-domain", "Δ in-domain", style="signed")]
        columns.append(Column("p in-domain", "p", style="p"))
        for collection in evaluated:
            columns.append(Column(collection, f"Δ {collection}", style="signed"))
            columns.append(Column(f"p {collection}", "p", style="p"))
        table = Table(
            columns,
            caption=f"{backbone}: change in {label} from the zero-shot backbone, on the training "
            "collection (in-domain) and on the others",
            label="tab:" + slug(f"{backbone}-transfer").lower(),
        )
        references = ", ".join(f"{c} {self.transfer[(backbone, c)].baseline_mean:.4f}" for c in evaluated)
        table.notes.append(
            f"Δ = {label} minus the zero-shot backbone's on the same collection (zero-shot: {references}); "
            f"† and p: {self.transfer[(backbone, evaluated[0])].test} against zero-shot, Bonferroni over the "
            "systems evaluated on that collection."
        )
        trained_on = list(dict.fromkeys(s.train_collection for s in self.systems))
        systems = sorted(
            (s for s in self.systems if s.backbone == backbone and s.kind != "zero-shot"),
            key=lambda s: (trained_on.index(s.train_collection), self._row_order(s)),
        )
        rows: dict[tuple[str, str], dict[str, Cell]] = {}
        for system in systems:
            comparison = self.transfer.get((backbone, system.eval_collection))
            if comparison is None:
                continue
            tested = comparison[system.transfer_label]
            in_domain = system.train_collection == system.eval_collection
            column = "in-domain" if in_domain else system.eval_collection
            cells = rows.setdefault(
                (system.train_collection, system.label), {"trained_on": Cell(system.train_collection)}
            )
            cells[column] = Cell(tested.mean_difference, dagger=tested.significant)
            cells[f"p {column}"] = Cell(tested.corrected_p_value)
        for (_, system_label), cells in rows.items():
            if set(cells) - {"trained_on", "in-domain", "p in-domain"}:  # evaluated off its collection
                table.rows.append(Row(system_label, cells))
        # A collection every row was trained on has its numbers under "in-domain" only.
        table.columns = [c for c in table.columns if any(c.key in row.cells for row in table.rows)]
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
                        if f.name not in ("per_query", "metrics", "query_groups")
                    },
                    "label": s.label,
                    "metrics_per_seed": dict(s.metrics),
                    "mean": {m: s.mean(m) for m in self.metrics},
                    "std": {m: s.std(m) for m in self.metrics},
                    "query_groups": {
                        name: {"num_queries": len(ids), **_group_means(s, self.metrics, ids)}
                        for name, ids in (s.query_groups or {}).items()
                    },
                }
                for s in self.systems
            ],
            "comparisons": {
                " / ".join(group): report.to_dict() for group, report in self.comparisons.items()
            },
            "query_group_comparisons": {
                " / ".join([*group, name]): report.to_dict()
                for (group, name), report in self.group_comparisons.items()
            },
            "transfer_comparisons": {
                " / ".join(key): report.to_dict() for key, report in self.transfer.items()
            },
        }


def in_domain_query_groups(members: list[SystemResult]) -> dict[str, list[str]] | None:
    """The query groups of a table's systems, when they were evaluated on their training collection.

    Off the training collection "seen" would mean seen by no system of the table, so there is none.
    """
    for system in members:
        if system.train_collection == system.eval_collection and system.query_groups:
            return system.query_groups
    return None


def _group_means(system: SystemResult, metrics: tuple[str, ...], ids: list[str]) -> dict[str, float]:
    return {m: system.group_mean_std(m, ids)[0] for m in metrics} if ids else {}


def _caption(group: tuple[str, str, str]) -> str:
    backbone, trained_on, evaluated_on = group
    return f"{backbone}: trained on {trained_on}, evaluated on {evaluated_on}"


def _table_label(group: tuple[str, str, str]) -> str:
    return "tab:" + slug("-".join(group)).lower()


def build_report(
    output_dir: str | Path,
    config: ReportConfig | None = None,
    metrics: tuple[str, ...] = PAPER_METRICS,
    cell_ids: Collection[str] | None = None,
) -> ExperimentReport:
    """Collect the finished cells of ``output_dir`` and test each system against the baseline variant
    (on all queries and on each query group) and against the zero-shot backbone (transfer).

    Args:
        output_dir: The experiment's results directory.
        config: The baseline variant, the metric tested and the test (its ``alpha`` and
            ``randomization_seed``); its ``plots`` and ``timing`` are for :func:`write_report`.
        metrics: The metrics collected.
        cell_ids: Only these cells (default: every finished cell).
    """
    config = config or ReportConfig()
    baseline, metric = config.baseline, config.metric
    systems = collect_results(output_dir, metrics, cell_ids)
    if not systems:
        raise UsageError(f"{output_dir}: no finished cells (cells/*/done.json) to report on")
    experiment = Path(output_dir) / EXPERIMENT_FILES.record
    order = list(read_json(experiment)["grid"]["variants"]) if experiment.exists() else []
    variants = sorted({system.variant for system in systems})
    if baseline not in variants and baseline != "fine-tuned":  # before, a report without any test
        raise UsageError(
            f"{output_dir}: baseline {baseline!r} is no variant of its finished cells ({', '.join(variants)})"
        )
    report = ExperimentReport(systems, {}, metrics, baseline, metric, order)
    significance = SignificanceTest(config.test, config.alpha, config.randomization_seed)
    tests = {"significance": significance, "metric": metric}
    for group, members in report.groups().items():
        base = next((s for s in members if s.variant == baseline), None)
        others = [s for s in members if s is not base]
        if base is None or not others:
            continue
        per_query = {base.label: base.mean_per_query(metric)}
        per_query.update({s.label: s.mean_per_query(metric) for s in others})
        report.comparisons[group] = compare_to_baseline(per_query, base.label, **tests)
        for name, ids in (in_domain_query_groups(members) or {}).items():
            # A paired test needs two queries; a smaller group is shown without one.
            if len(ids) >= 2:
                restricted = {label: restrict(scores, ids) for label, scores in per_query.items()}
                report.group_comparisons[(group, name)] = compare_to_baseline(restricted, base.label, **tests)
    report.transfer = _transfer_comparisons(report, tests)
    return report


def _transfer_comparisons(
    report: ExperimentReport, tests: dict[str, Any]
) -> dict[tuple[str, str], ComparisonReport]:
    """Per (backbone, evaluation collection) with a zero-shot system: every other system against it."""
    zero_shots: dict[tuple[str, str], SystemResult] = {}
    # Any zero-shot cell of the backbone evaluated there will do (they score the same untrained model);
    # prefer the one of that collection, without a head's inference rule.
    ranked = sorted(
        (s for s in report.systems if s.kind == "zero-shot"),
        key=lambda s: (s.train_collection != s.eval_collection, s.rule != "model", s.experts),
    )
    for system in ranked:
        zero_shots.setdefault((system.backbone, system.eval_collection), system)
    comparisons = {}
    for key, zero_shot in zero_shots.items():
        others = [
            s for s in report.systems if s.kind != "zero-shot" and (s.backbone, s.eval_collection) == key
        ]
        if not others:
            continue
        per_query = {ZERO_SHOT: zero_shot.mean_per_query(report.primary_metric)}
        per_query.update({s.transfer_label: s.mean_per_query(report.primary_metric) for s in others})
        comparisons[key] = compare_to_baseline(per_query, ZERO_SHOT, **tests)
    return comparisons


def write_report(
    report: ExperimentReport, directory: str | Path, plots: bool = True, timing: bool = False
) -> list[Path]:
    """Write tables.md, tables.tex, results.json and (unless ``plots`` is off) the PNG plots
    (:func:`sbmoe.study.figures.write_figures`) into ``directory``: nothing there, or an earlier report.
    ``timing``: see :meth:`ExperimentReport.to_report`.

    Raises:
        UsageError: ``directory`` holds something else, or another process writes it.
    """
    directory = Path(directory)
    with writing_output(directory, REPORT):
        rendered = report.to_report(timing)
        written = [rendered.save(directory / name) for name in REPORT_FILES.tables]
        if plots:
            from sbmoe.study.figures import write_figures

            written += write_figures(report.groups(), report.primary_metric, report.baseline, directory)
    return written
