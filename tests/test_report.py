"""Reports on hand-made finished cells: means over seeds, significance marks, tables, plots."""

from __future__ import annotations

import pytest

from sbmoe.evaluation import PAPER_METRICS
from sbmoe.io import read_json, write_json
from sbmoe.report import build_report, write_report

QUERIES = [f"q{i}" for i in range(12)]
BASE = [0.30, 0.42, 0.55, 0.61, 0.25, 0.48, 0.52, 0.39, 0.66, 0.44, 0.58, 0.35]
# SB-MoE top1: +0.10 on every query (t-test: significant); all: +-0.05 alternating (not significant).
TOP1 = [b + 0.10 for b in BASE]
ALL = [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(BASE)]


def write_cell(root, variant, experts, seed, rules: dict[str, list[float]], routing=False):
    cell_id = f"bb__c__{variant}" + (f"__n{experts}" if experts else "") + f"__s{seed}"
    folder = root / "cells" / cell_id
    evaluations = {}
    for rule, scores in rules.items():
        shifted = [s + 0.01 * (seed - 1) for s in scores]  # seeds differ a little
        directory = folder / "eval" / "c" / (rule if len(rules) > 1 else "")
        metrics = {m: sum(shifted) / len(shifted) for m in PAPER_METRICS}
        write_json(directory / "metrics.json", {**metrics, "num_queries": len(shifted)})
        write_json(
            directory / "per_query.json", {m: dict(zip(QUERIES, shifted, strict=True)) for m in PAPER_METRICS}
        )
        evaluations[rule] = metrics
    if routing:
        usage = {
            "usage": [0.75, 0.25],
            "entropy": 0.5,
            "max_entropy": 0.69,
            "mean_text_entropy": 0.3,
            "max_share": 0.75,
            "count": 12,
        }
        write_json(folder / "eval" / "c" / "routing.json", {"queries": usage, "documents": usage})
    cell = {"backbone": "bb", "collection": "c", "variant": variant, "experts": experts, "seed": seed}
    write_json(folder / "done.json", {"cell": cell, "evaluations": {"c": evaluations}})


@pytest.fixture()
def experiment(tmp_path):
    for seed in (1, 2):
        write_cell(tmp_path, "fine-tuned", 0, seed, {"model": BASE})
        write_cell(tmp_path, "sb-moe", 2, seed, {"top1": TOP1, "all": ALL}, routing=True)
    return tmp_path


def test_means_over_seeds_and_significance(experiment):
    report = build_report(experiment)
    systems = {s.label: s for s in report.systems}
    assert set(systems) == {"fine-tuned", "sb-moe N=2 top1", "sb-moe N=2 all"}
    base = systems["fine-tuned"]
    assert base.seeds == [1, 2]
    assert base.mean("ndcg@10") == pytest.approx(sum(BASE) / 12 + 0.005)
    assert base.std("ndcg@10") == pytest.approx(0.01 / 2**0.5)  # sample std of two values 0.01 apart
    comparison = report.comparisons[("bb", "c", "c")]
    verdict = {c.system: c.significant for c in comparison.comparisons}
    assert verdict == {"sb-moe N=2 top1": True, "sb-moe N=2 all": False}
    assert all(c.corrected_p_value == pytest.approx(min(1.0, 2 * c.p_value)) for c in comparison.comparisons)


def test_tables_mark_best_and_significant(experiment):
    report = build_report(experiment)
    markdown = report.markdown()
    top1_row = next(line for line in markdown.splitlines() if line.startswith("| sb-moe N=2 top1"))
    all_row = next(line for line in markdown.splitlines() if line.startswith("| sb-moe N=2 all"))
    assert "**" in top1_row and "†" in top1_row  # best and significant
    assert "†" not in all_row
    latex = report.latex()
    assert r"\textbf{" in latex and r"$^\dagger$" in latex and r"\begin{tabular}" in latex
    assert "sb-moe N=2 top1" in latex


def test_written_report_has_tables_results_and_plots(experiment, tmp_path):
    written = write_report(build_report(experiment), tmp_path / "report")
    names = {path.name for path in written}
    assert {"tables.md", "tables.tex", "results.json", "metric_vs_experts.png", "expert_usage.png"} <= names
    results = read_json(tmp_path / "report" / "results.json")
    top1 = next(s for s in results["systems"] if s["label"] == "sb-moe N=2 top1")
    assert top1["metrics_per_seed"]["ndcg@10"] == pytest.approx([sum(TOP1) / 12, sum(TOP1) / 12 + 0.01])
    assert (tmp_path / "report" / "metric_vs_experts.png").read_bytes()[:4] == b"\x89PNG"


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished cells"):
        build_report(tmp_path)
