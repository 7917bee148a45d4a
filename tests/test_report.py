"""Reports on hand-made finished cells: means over seeds, significance marks, tables, plots."""

from __future__ import annotations

import shutil

import pytest

from sbmoe.evaluation import PAPER_METRICS
from sbmoe.io import read_json, write_json
from sbmoe.report import build_report, write_report

QUERIES = [f"q{i}" for i in range(12)]
BASE = [0.30, 0.42, 0.55, 0.61, 0.25, 0.48, 0.52, 0.39, 0.66, 0.44, 0.58, 0.35]
# SB-MoE top1: +0.10 on every query (t-test: significant); all: +-0.05 alternating (not significant).
TOP1 = [b + 0.10 for b in BASE]
ALL = [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(BASE)]


def write_cell(root, variant, experts, seed, rules: dict[str, list[float]], routing=False, trains=True):
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
    cell["trains"] = trains
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
    report = build_report(experiment).to_report()
    markdown = report.to_markdown()
    top1_row = next(line for line in markdown.splitlines() if line.startswith("| sb-moe N=2 top1"))
    all_row = next(line for line in markdown.splitlines() if line.startswith("| sb-moe N=2 all"))
    assert "**" in top1_row and "†" in top1_row  # best and significant
    assert "†" not in all_row
    latex = report.to_latex()
    assert r"\textbf{" in latex and r"$^\dagger$" in latex and r"\begin{tabular}" in latex
    assert "sb-moe N=2 top1" in latex


def test_tables_order_rows_name_metrics_and_hide_a_constant_seed_count(experiment):
    write_cell(experiment, "zero-shot", 0, 1, {"model": BASE}, trains=False)
    write_cell(experiment, "one-expert", 1, 1, {"model": BASE})
    write_cell(experiment, "one-expert", 1, 2, {"model": BASE})
    table = build_report(experiment).to_report().tables[0]
    labels = [row.label for row in table.rows]
    # zero-shot, baselines, controls, SB-MoE; an MoE model's rules in the order top1, topk, all
    assert labels == ["zero-shot", "fine-tuned", "one-expert N=1", "sb-moe N=2 top1", "sb-moe N=2 all"]
    headers = [c.header for c in table.columns]
    assert headers == ["seeds", "nDCG@10", "R@100", "MRR@10", "MAP@100", "P@1", "nDCG@3", "p"]
    top1 = table.rows[3].cells
    assert top1["p"].value < 0.05 and top1["ndcg@10"].dagger and "p" not in table.rows[1].cells

    shutil.rmtree(experiment / "cells" / "bb__c__zero-shot__s1")
    report = build_report(experiment).to_report()
    assert "seeds" not in [c.header for c in report.tables[0].columns]
    assert "2 seeds per system." in report.tables[0].notes
    latex = report.to_latex()
    assert r"\label{tab:bb-c-c}" in latex and r"\caption{bb: trained on c, evaluated on c. 2 seeds" in latex
    assert r"\toprule" in latex and "nDCG@10 & R@100" in latex


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
