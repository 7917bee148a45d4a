"""Reports on hand-made finished cells: means over seeds, significance marks, tables, plots."""

from __future__ import annotations

import re
import shutil

import pytest

from sbmoe.config.jobs import JobOptions, ReportConfig
from sbmoe.core.choices import PAPER_METRICS
from sbmoe.core.io import read_json, write_json
from sbmoe.study.figures import choose_tsne_query
from sbmoe.study.report import build_report, write_report
from sbmoe.study.results import system_kind

QUERIES = [f"q{i}" for i in range(12)]
BASE = [0.30, 0.42, 0.55, 0.61, 0.25, 0.48, 0.52, 0.39, 0.66, 0.44, 0.58, 0.35]
# SB-MoE top1: +0.10 on every query (t-test: significant); all: +-0.05 alternating (not significant).
TOP1 = [b + 0.10 for b in BASE]
ALL = [b + (0.05 if i % 2 else -0.05) for i, b in enumerate(BASE)]


def write_cell(
    root,
    variant,
    experts,
    seed,
    rules: dict[str, list[float]],
    routing=False,
    trains=True,
    *,
    collection="c",
    transfer: dict[str, dict[str, list[float]]] | None = None,
    groups: dict[str, list[str]] | None = None,
    control: str | None = None,
    model: dict | None = None,
):
    """A finished cell as experiments.run_cell leaves it: per-query scores of each rule on its
    collection (and on the ``transfer`` collections), optional query groups, routing and cell.json."""
    cell_id = f"bb__{collection}__{variant}" + (f"__n{experts}" if experts else "") + f"__s{seed}"
    folder = root / "cells" / cell_id
    evaluations = {}
    for eval_name, scores_per_rule in {collection: rules, **(transfer or {})}.items():
        evaluations[eval_name] = {}
        for rule, scores in scores_per_rule.items():
            shifted = [s + 0.01 * (seed - 1) for s in scores]  # seeds differ a little
            directory = folder / "eval" / eval_name / (rule if len(scores_per_rule) > 1 else "")
            metrics = {m: sum(shifted) / len(shifted) for m in PAPER_METRICS}
            write_json(directory / "metrics.json", {**metrics, "num_queries": len(shifted)})
            per_query = {m: dict(zip(QUERIES, shifted, strict=True)) for m in PAPER_METRICS}
            write_json(directory / "per_query.json", per_query)
            if groups and eval_name == collection:
                write_json(directory / "query_groups.json", groups)
            evaluations[eval_name][rule] = metrics
    if routing:
        usage = {
            "usage": [0.75, 0.25],
            "entropy": 0.5,
            "max_entropy": 0.69,
            "mean_text_entropy": 0.3,
            "max_share": 0.75,
            "count": 12,
        }
        write_json(folder / "eval" / collection / "routing.json", {"queries": usage, "documents": usage})
    cell = {"backbone": "bb", "collection": collection, "variant": variant, "experts": experts, "seed": seed}
    cell["trains"] = trains
    if control:
        cell["control"] = control
    if model is not None:
        write_json(folder / "cell.json", {"cell": cell, "model_config": {"num_experts": experts, **model}})
    write_json(folder / "done.json", {"cell": cell, "evaluations": evaluations})


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
    assert {"tables.md", "tables.tex", "results.json", "systems.png", "expert_usage.png"} <= names
    # One expert count: no plot against the number of experts (one point per line says nothing).
    assert "metric_vs_experts.png" not in names
    results = read_json(tmp_path / "report" / "results.json")
    top1 = next(s for s in results["systems"] if s["label"] == "sb-moe N=2 top1")
    assert top1["metrics_per_seed"]["ndcg@10"] == pytest.approx([sum(TOP1) / 12, sum(TOP1) / 12 + 0.01])
    assert (tmp_path / "report" / "systems.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("damage", "message"),
    [  # before: a report with no test at all, a JSONDecodeError and a TypeError traceback
        (None, "baseline 'nosuch' is no variant of its finished cells (fine-tuned, sb-moe)"),
        (("metrics.json", "{"), "metrics.json: unreadable (Expecting property name"),
        (("per_query.json", "[]"), "per_query.json: expected a JSON object, got list"),
    ],
)
def test_an_unknown_baseline_or_damaged_scores_are_refused_naming_them(experiment, damage, message):
    if damage is None:
        with pytest.raises(ValueError, match=re.escape(message)):
            build_report(experiment, ReportConfig(baseline="nosuch"))
        return
    name, text = damage
    next(experiment.rglob(name)).write_text(text, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message)):
        build_report(experiment)


def test_empty_directory_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no finished cells"):
        build_report(tmp_path)


@pytest.mark.parametrize(
    ("cell", "model", "kind"),
    [
        ({"trains": False, "experts": 0}, None, "zero-shot"),
        ({"trains": False, "experts": 3}, {"num_experts": 3}, "zero-shot"),  # an untrained head
        ({"trains": False, "experts": 0, "control": "zero-shot+prior"}, None, "control"),
        ({"trains": True, "experts": 0, "control": "document-prior"}, None, "control"),
        ({"trains": True, "experts": 0}, {"num_experts": 0}, "baseline"),
        ({"trains": True, "experts": 0}, {"num_experts": 0, "head": "linear"}, "control"),
        ({"trains": True, "experts": 1}, {"num_experts": 1}, "control"),
        ({"trains": True, "experts": 4}, {"num_experts": 4, "gating": "random"}, "control"),
        ({"trains": True, "experts": 4}, {"num_experts": 4, "gating": "learned"}, "sb-moe"),
        ({"trains": True, "experts": 4}, None, "sb-moe"),  # no cell.json: done.json decides
    ],
)
def test_system_kind_rules(cell, model, kind):
    assert system_kind(cell, model) == kind


# Query groups of collection c: 6 seen, 1 partly-seen, 5 unseen.
GROUPS = {"seen": QUERIES[:6], "partly-seen": QUERIES[6:7], "unseen": QUERIES[7:]}
# A model that learned the training documents: +0.2 on queries whose answers it saw, +-0.05 on the
# unseen ones (no gain); on collection d, where it did not train, +-0.01 around zero-shot.
MEMORIZER = [b + 0.2 if i < 7 else b + (0.05 if i % 2 else -0.05) for i, b in enumerate(BASE)]
ZERO_C = [b - 0.05 for b in BASE]
ZERO_D = [0.2 + 0.03 * i for i in range(12)]
MEMORIZER_D = [z + (0.01 if i % 2 else -0.01) for i, z in enumerate(ZERO_D)]
FINE_TUNED_D = [z - 0.04 for z in ZERO_D]  # fine-tuning on c costs 0.04 on d on every query


def mean(values):
    return sum(values) / len(values)


@pytest.fixture()
def study(tmp_path):
    """Zero-shot, a baseline, two controls and an SB-MoE on c, the trained ones evaluated on d too."""
    grouped = {"groups": GROUPS}
    write_cell(
        tmp_path,
        "zero-shot",
        0,
        1,
        {"model": ZERO_C},
        trains=False,
        transfer={"d": {"model": ZERO_D}},
        **grouped,
    )
    write_cell(tmp_path, "prior", 0, 1, {"model": BASE}, trains=False, control="zero-shot+prior", **grouped)
    for seed in (1, 2):
        write_cell(
            tmp_path,
            "fine-tuned",
            0,
            seed,
            {"model": BASE},
            transfer={"d": {"model": FINE_TUNED_D}},
            **grouped,
        )
        write_cell(tmp_path, "linear", 0, seed, {"model": BASE}, model={"head": "linear"}, **grouped)
        write_cell(
            tmp_path,
            "sb-moe",
            2,
            seed,
            {"model": MEMORIZER},
            transfer={"d": {"model": MEMORIZER_D}},
            **grouped,
        )
    write_json(
        tmp_path / "experiment.json",
        {"grid": {"variants": {"sb-moe": {}, "fine-tuned": {}, "linear": {}, "prior": {}, "zero-shot": {}}}},
    )
    return tmp_path


def test_rows_run_zero_shot_baselines_controls_sb_moe_whatever_the_grid_order(study):
    tables = build_report(study).to_report().tables
    assert [t.label for t in tables] == ["tab:bb-c-c", "tab:bb-c-c-seen", "tab:bb-c-d", "tab:bb-transfer"]
    assert [row.label for row in tables[0].rows] == [
        "zero-shot",
        "fine-tuned",
        "linear",
        "prior",
        "sb-moe N=2",
    ]
    assert "seeds" in [c.key for c in tables[0].columns]  # 1 seed for the untrained, 2 for the rest


def test_seen_and_unseen_columns_with_significance_per_group(study):
    report = build_report(study)
    table = report.to_report().tables[1]
    headers = [c.header for c in table.columns]
    assert headers == [
        "nDCG@10 all (n=12)",
        "p",
        "nDCG@10 seen (n=6)",
        "p",
        "nDCG@10 partly-seen (n=1)",
        "nDCG@10 unseen (n=5)",
        "p",
    ]  # a group of one query is shown without a test
    rows = {row.label: row.cells for row in table.rows}
    moe = rows["sb-moe N=2"]
    assert moe["seen"].value == pytest.approx(mean(MEMORIZER[:6]) + 0.005)  # two seeds 0.01 apart
    assert moe["unseen"].value == pytest.approx(mean(MEMORIZER[7:]) + 0.005)
    assert moe["seen"].dagger and moe["p seen"].value < 0.05  # the gain is all on seen queries
    assert not moe["unseen"].dagger and moe["p unseen"].value > 0.05
    assert rows["zero-shot"]["seen"].value == pytest.approx(mean(ZERO_C[:6]))
    assert "p seen" not in rows["fine-tuned"]  # the baseline itself

    group = ("bb", "c", "c")
    seen = report.group_comparisons[(group, "seen")]
    assert seen.comparisons[0].num_queries == 6 and len(seen.comparisons) == 4  # every other system
    assert all(c.corrected_p_value == pytest.approx(min(1.0, 4 * c.p_value)) for c in seen.comparisons)
    assert (group, "partly-seen") not in report.group_comparisons
    # Off its training collection a table has no groups: "seen" would mean seen by nobody there.
    assert not any((("bb", "c", "d"), name) in report.group_comparisons for name in GROUPS)

    markdown = report.to_report().to_markdown()
    assert "| nDCG@10 all (n=12) | p | nDCG@10 seen (n=6) |" in markdown
    latex = report.to_report().to_latex()
    assert r"\label{tab:bb-c-c-seen}" in latex and r"\toprule" in latex
    results = report.to_dict()
    moe_system = next(
        s for s in results["systems"] if s["label"] == "sb-moe N=2" and s["eval_collection"] == "c"
    )
    assert moe_system["query_groups"]["seen"]["num_queries"] == 6
    assert "bb / c / c / unseen" in results["query_group_comparisons"]


def test_transfer_deltas_from_zero_shot_with_significance(study):
    report = build_report(study)
    table = report.to_report().tables[-1]
    # c has no column of its own: every row was trained on it (its numbers are in-domain).
    assert [c.header for c in table.columns] == ["trained on", "Δ in-domain", "p", "Δ d", "p"]
    rows = {row.label: row.cells for row in table.rows}
    assert list(rows) == ["fine-tuned", "sb-moe N=2"]  # the others were not evaluated off c
    moe, tuned = rows["sb-moe N=2"], rows["fine-tuned"]
    assert moe["trained_on"].value == "c"
    assert moe["in-domain"].value == pytest.approx(mean(MEMORIZER) + 0.005 - mean(ZERO_C))
    assert moe["in-domain"].dagger
    assert moe["d"].value == pytest.approx(0.005) and not moe["d"].dagger  # seeds 0.01 apart, no gain
    assert tuned["d"].value == pytest.approx(-0.04 + 0.005) and tuned["d"].dagger  # a loss, significant
    on_d = report.transfer[("bb", "d")]
    assert on_d.baseline == "zero-shot" and {c.system for c in on_d.comparisons} == {
        "fine-tuned (c)",
        "sb-moe N=2 (c)",
    }
    assert tuned["p d"].value == on_d["fine-tuned (c)"].corrected_p_value
    assert "zero-shot: c 0.4125, d 0.3650" in table.notes[0]
    latex = report.to_report().to_latex()
    assert r"\label{tab:bb-transfer}" in latex and r"$\Delta$ d" in latex and r"\bottomrule" in latex


def test_written_report_carries_the_new_comparisons(study, tmp_path):
    write_report(build_report(study), tmp_path / "report", plots=False)
    results = read_json(tmp_path / "report" / "results.json")
    assert set(results["transfer_comparisons"]) == {"bb / c", "bb / d"}
    markdown = (tmp_path / "report" / "tables.md").read_text(encoding="utf-8")
    assert "Δ in-domain" in markdown and "seen (n=6)" in markdown


def png_title(path) -> str:
    """The panel titles sbmoe.study.plots writes into a PNG's Title text, whitespace collapsed."""
    from PIL import Image

    with Image.open(path) as image:
        return " ".join(image.text["Title"].split())


def test_figures_say_what_they_show(study, tmp_path):
    write_cell(
        study, "sb-moe", 2, 1, {"model": MEMORIZER}, routing=True, transfer={"d": {"model": MEMORIZER_D}}
    )
    written = write_report(build_report(study), tmp_path / "report")
    names = {path.name for path in written}
    assert {"systems.png", "gain_over_zero_shot.png", "expert_usage.png"} <= names
    # The bars are hard top-1 shares; the title says so, and names no (soft-gate) entropy.
    usage = png_title(tmp_path / "report" / "expert_usage.png")
    assert "top-1 share of the busiest expert 75.0% of queries, 75.0% of documents" in usage
    assert "entropy" not in usage
    # Systems on their own collection; gains over zero-shot per training collection (in-domain and
    # transfer as two series of one panel, the zero-shot reference at 0).
    assert png_title(tmp_path / "report" / "systems.png") == "bb / c"
    assert png_title(tmp_path / "report" / "gain_over_zero_shot.png") == "bb, trained on c"

    # Several expert counts of one variant: the metric against the number of experts, one panel per
    # training -> evaluation pair (a transfer line is never drawn into the in-domain one).
    write_cell(
        study, "sb-moe", 3, 1, {"model": MEMORIZER}, routing=True, transfer={"d": {"model": MEMORIZER_D}}
    )
    write_report(build_report(study), tmp_path / "again")
    assert png_title(tmp_path / "again" / "metric_vs_experts.png") == "bb / c | bb / c → d"


def test_tsne_query_choice_and_what_its_title_says():
    experts = {"a1": 0, "a2": 0, "b1": 1, "b2": 2, "c1": 1, "c2": 1}
    ranked = {"a": ["a1", "a2"], "b": ["b1", "b2", "a1"], "c": ["c1", "c2"]}
    assert choose_tsne_query(ranked, experts) == ("b", "its top 10 documents span 3 experts")
    assert choose_tsne_query({"a": ["a1", "a2"], "c": ["c1", "c2"]}, experts) == (
        "a",
        "the top 10 documents of each of 2 queries share one expert",
    )
    assert choose_tsne_query({"c": ["c1", "c2"], "b": ["b1"]}, experts) == (
        "c",
        "routing collapsed: all 3 documents examined go to expert 1",
    )
    with pytest.raises(ValueError):
        choose_tsne_query({}, experts)


def test_tsne_of_a_trained_moe_model(tiny_bert_dir, scifact_slice, tmp_path):
    import torch

    from sbmoe.config.jobs import EvaluateConfig
    from sbmoe.config.model import ModelConfig
    from sbmoe.data.beir import load_collection
    from sbmoe.evaluation.evaluate import evaluate_model
    from sbmoe.model.retriever import Retriever
    from sbmoe.study.grid import eval_dir

    # A cell folder as run_cell leaves it, with an untrained MoE model standing in for a trained one.
    torch.manual_seed(0)
    retriever = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3), device="cpu")
    name = str(scifact_slice)
    folder = tmp_path / "cells" / "bb__slice__sb-moe__n3__s1"
    retriever.save(folder / "model")
    config = EvaluateConfig(metrics=list(PAPER_METRICS))
    evaluate_model(
        retriever,
        load_collection(scifact_slice),
        eval_dir(folder, name),
        config,
        options=JobOptions(show_progress=False),
    )
    cell = {
        "backbone": "bb",
        "collection": name,
        "variant": "sb-moe",
        "experts": 3,
        "seed": 1,
        "trains": True,
    }
    write_json(folder / "done.json", {"cell": cell, "evaluations": {name: {"model": {}}}})

    written = write_report(build_report(tmp_path), tmp_path / "report")
    [tsne] = [path for path in written if path.name.startswith("tsne_")]
    title = png_title(tsne)
    assert f"{name}, query " in title and ": top 50 documents (sb-moe, N=3, model); " in title
    # A random gate sends a random model's texts to one expert, and the title says so.
    assert "routing collapsed: all " in title

    # Weights deleted to save space (as after a GPU run): the tables still come, the t-SNE is skipped.
    (folder / "model" / "model.safetensors").unlink()
    with pytest.warns(UserWarning, match="t-SNE of .* skipped"):
        written = write_report(build_report(tmp_path), tmp_path / "report-again")
    assert not [path for path in written if path.name.startswith("tsne_")]
    assert (tmp_path / "report-again" / "tables.md").exists()


def test_figure_head_outputs_leave_the_model_as_they_found_it(tiny_bert_dir):
    import numpy as np
    import torch

    from sbmoe.config.model import ModelConfig
    from sbmoe.inference.encoding import apply_head_stages, encode_pooled
    from sbmoe.inference.routing import route
    from sbmoe.model.retriever import Retriever
    from sbmoe.study.figures import _head_outputs

    torch.manual_seed(0)
    config = ModelConfig(backbone=str(tiny_bert_dir), num_experts=3, expert_pooling="top1")
    retriever = Retriever.from_config(config, device="cpu")
    retriever.model.train()  # as a caller in the middle of training would hold it
    texts = ["vitamin d and depression", "aspirin lowers the risk of stroke", "a b c"]
    points, experts = _head_outputs(retriever, texts, "query", "all")
    assert retriever.model.training and retriever.head.training
    assert retriever.head.expert_pooling == "top1"
    # The same numbers as the inference path under the rule asked for, and the head's own routing.
    retriever.model.eval()
    pooled = encode_pooled(retriever, texts, "query")
    expected = apply_head_stages(retriever, pooled, "query", rule="all")
    expected = expected / np.linalg.norm(expected, axis=-1, keepdims=True)
    np.testing.assert_allclose(points, expected, atol=1e-6)
    assert experts.tolist() == route(retriever, pooled)[0].tolist()
    assert len(points) == len(experts) == 3


def test_timing_says_which_systems_re_encode_the_corpus(tmp_path):
    """A head on the document side (or a fine-tuned backbone) means re-indexing; a query-side head,
    a control or the untrained model does not."""
    write_cell(tmp_path, "zero-shot", 0, 1, {"model": BASE}, trains=False)
    write_cell(tmp_path, "fine-tuned", 0, 1, {"model": BASE})
    write_cell(tmp_path, "query-moe", 2, 1, {"model": TOP1}, model={"head_side": "query"})
    write_cell(tmp_path, "both-moe", 2, 1, {"model": TOP1}, model={"head_side": "both"})
    write_cell(tmp_path, "procrustes", 0, 1, {"model": ALL}, trains=False, control="procrustes")
    table = build_report(tmp_path, ReportConfig(baseline="zero-shot")).to_report(timing=True).tables[0]
    reindexes = {row.label: row.cells["reindexes"].value for row in table.rows}
    assert reindexes == {
        "zero-shot": "no",
        "fine-tuned": "yes",
        "query-moe N=2": "no",
        "both-moe N=2": "yes",
        "procrustes": "no",
    }
    assert "re-encodes corpus" not in build_report(tmp_path).to_report().tables[0].to_markdown()
