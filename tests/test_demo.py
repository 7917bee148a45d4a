"""The demo end to end with a tiny model on a real SciFact slice: table, files, reuse, refusal."""

from __future__ import annotations

import dataclasses

import pytest

from sbmoe.demo import DemoConfig, run_demo
from sbmoe.evaluation import PAPER_METRICS
from sbmoe.io import read_json


@pytest.fixture(scope="module")
def demo(tiny_bert_dir, scifact_slice, tmp_path_factory):
    config = DemoConfig(
        data=str(scifact_slice),
        model=str(tiny_bert_dir),
        output=str(tmp_path_factory.mktemp("demo") / "out"),
        batch_size=8,
        num_experts=2,
        max_doc_length=32,
        precision="fp32",
    )
    return config, run_demo(config, show_progress=False, command=["sbmoe", "demo"])


def test_table_has_every_system_and_metric(demo):
    _, report = demo
    systems = [row.system for row in report.rows]
    assert systems == [
        "zero-shot (sentence-transformers encode)",
        "zero-shot (sbmoe)",
        "fine-tuned baseline",
        "SB-MoE learned gating, 2 experts, top1",
        "SB-MoE learned gating, 2 experts, all",
    ]
    table = report.markdown()
    for name in (*systems, *PAPER_METRICS, "Budget: epochs 1"):
        assert name in table
    assert all(row.train_seconds is not None for row in report.rows[2:])


def test_outputs_and_settings_are_saved(demo):
    config, report = demo
    out = config.output
    saved = read_json(f"{out}/demo.json")
    assert [row["system"] for row in saved["rows"]] == [row.system for row in report.rows]
    assert read_json(f"{out}/demo_config.json")["config"] == dataclasses.asdict(config)
    assert read_json(f"{out}/sb-moe/test/all/metrics.json")["expert_pooling"] == "all"
    assert read_json(f"{out}/fine-tuned/model/training/done.json")["steps"] > 0


def test_second_run_reuses_finished_stages(demo):
    config, report = demo
    again = run_demo(config, show_progress=False)
    assert [row.metrics for row in again.rows] == [row.metrics for row in report.rows]
    assert again.wall_seconds < report.wall_seconds


def test_other_settings_in_the_same_output_are_refused(demo):
    config, _ = demo
    with pytest.raises(ValueError, match="other settings"):
        run_demo(dataclasses.replace(config, num_experts=3), show_progress=False)
