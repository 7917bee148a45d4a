"""The demo end to end with a tiny model on a real SciFact slice: table, files, reuse, refusal."""

from __future__ import annotations

import pytest

from sbmoe.config.jobs import JobOptions
from sbmoe.core.choices import PAPER_METRICS
from sbmoe.core.io import read_json
from sbmoe.evaluation.tables import metric_label
from sbmoe.study.demo import DEMO_GRID, demo_grid, run_demo
from sbmoe.study.grid import eval_dir, expand, load_grid


@pytest.fixture(scope="module")
def demo(tiny_bert_dir, scifact_slice, tmp_path_factory):
    output = tmp_path_factory.mktemp("demo") / "out"
    model = {"backbone": str(tiny_bert_dir), "num_experts": 2, "max_doc_length": 32, "gating": None}
    train = {"batch_size": 8, "precision": "fp32"}
    settings = {"model_overrides": model, "train_overrides": train, "data": str(scifact_slice)}
    report = run_demo(output, **settings, options=JobOptions(show_progress=False, command=["sbmoe", "demo"]))
    return output, settings, report


def test_the_demo_grid_is_the_documented_one():
    model, train = DEMO_GRID.model, DEMO_GRID.train
    assert (DEMO_GRID.backbones, DEMO_GRID.collections, DEMO_GRID.experts) == (
        ["all-MiniLM-L6-v2"],
        ["scifact"],
        [6],
    )
    assert model["gating"] == "learned" and DEMO_GRID.evaluate["expert_poolings"] == ["top1", "all"]
    assert (train["epochs"], train["batch_size"], train["checkpoint_selection"]) == (1, 32, "last")
    assert [c.variant for c in expand(DEMO_GRID)] == ["zero-shot", "fine-tuned", "sb-moe"]
    grid = demo_grid({"backbone": "m", "gating": "paper", "num_experts": 3}, {"seed": 7, "epochs": 2}, "d")
    assert (grid.backbones, grid.experts, grid.seeds, grid.collections) == (["m"], [3], [7], ["d"])
    assert grid.model["gating"] == "paper" and grid.train["epochs"] == 2
    assert DEMO_GRID.backbones == ["all-MiniLM-L6-v2"]  # the built-in grid is left as it was
    with pytest.raises(ValueError, match="unknown settings"):
        demo_grid({}, {"learning_rate": 1.0})


def test_table_has_every_system_and_metric(demo):
    _, _, report = demo
    rows = report.tables[0].rows
    systems = [row.label for row in rows]
    assert systems == [
        "zero-shot (sentence-transformers encode)",
        "zero-shot",
        "fine-tuned",
        "sb-moe N=2 top1",
        "sb-moe N=2 all",
    ]
    table = report.to_markdown()
    for name in (*systems, *map(metric_label, PAPER_METRICS), "Budget: epochs 1", "sentence-transformers:"):
        assert name in table
    assert all(isinstance(row.cells["train_seconds"].value, float) for row in rows[2:])
    assert all(row.cells["train_seconds"].value == "—" for row in rows[:2])
    assert [row.cells["reindexes"].value for row in rows] == ["no", "no", "yes", "yes", "yes"]
    assert r"\label{tab:demo}" in report.to_latex()
    # SciFact's test queries split by whether their answers were training positives (16 in the slice).
    seen = report.tables[1]
    assert seen.label == "tab:demo-seen" and seen.columns[0].header == "nDCG@10 all (n=16)"
    assert [row.label for row in seen.rows] == systems[1:]


def test_outputs_and_settings_are_saved(demo):
    out, settings, report = demo
    saved = read_json(out / "demo.json")
    assert [row["label"] for row in saved["tables"][0]["rows"]] == [
        row.label for row in report.tables[0].rows
    ]
    assert saved["provenance"]["command"] == ["sbmoe", "demo"]
    grid = load_grid(out / "grid.yaml")
    assert grid == demo_grid(settings["model_overrides"], settings["train_overrides"], settings["data"])
    assert read_json(out / "experiment.json")["grid"]["experts"] == [2]
    cells = {c.variant: out / "cells" / c.cell_id for c in expand(grid)}
    evaluation = eval_dir(cells["sb-moe"], settings["data"])
    assert evaluation.is_relative_to(out)  # a collection given as a folder is written under its slug
    assert read_json(evaluation / "all" / "metrics.json")["expert_pooling"] == "all"
    assert read_json(cells["fine-tuned"] / "model" / "training" / "done.json")["steps"] > 0
    assert read_json(out / "reference-st" / "metrics.json")["settings"]["max_length"] == 32


def test_second_run_reuses_finished_stages(demo):
    out, settings, report = demo
    again = run_demo(out, **settings, options=JobOptions(show_progress=False))
    values = [
        {k: c.value for k, c in row.cells.items() if k in PAPER_METRICS} for row in again.tables[0].rows
    ]
    assert values == [
        {k: c.value for k, c in row.cells.items() if k in PAPER_METRICS} for row in report.tables[0].rows
    ]
    assert len(again.data["summary"]["skipped"]) == 3 and not again.data["summary"]["finished"]
    assert again.data["wall_seconds"] < report.data["wall_seconds"]


def test_other_settings_in_the_same_output_are_refused(demo):
    out, settings, _ = demo
    changed = {**settings["model_overrides"], "max_doc_length": 16}
    with pytest.raises(ValueError, match="other settings"):
        run_demo(
            out,
            changed,
            settings["train_overrides"],
            data=settings["data"],
            options=JobOptions(show_progress=False),
        )
