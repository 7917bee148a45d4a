"""What a training run tells people: the start-up record and line, and TensorBoard's event files."""

from __future__ import annotations

import json

import pytest

from sbmoe.config.model import ModelConfig
from sbmoe.config.train import TrainConfig
from sbmoe.data.beir import load_collection, positive_pairs, train_dev_split
from sbmoe.training.run import run_settings


def log_records(output) -> list[dict]:
    return [json.loads(line) for line in (output / "training" / "log.jsonl").read_text().splitlines()]


def test_the_log_opens_with_a_start_up_record_and_line(tensorboard_run):
    output, _, messages = tensorboard_run
    start = log_records(output)[0]
    collection = load_collection(output.parent / "scifact")
    train_qrels, dev_qrels = train_dev_split(collection, seed=42)
    assert start["event"] == "start" and start["step"] == 0 and start["resumed_from_step"] is None
    assert start["training_pairs"] == len(positive_pairs(train_qrels))
    assert start["dev_queries"] == len(dev_qrels)
    assert start["dev_set"] == "10% of the train queries, held out"  # the slice has no dev split
    assert start["steps_per_epoch"] >= len(positive_pairs(train_qrels)) // 8
    assert (start["total_steps"], start["batch_size"], start["processes"]) == (3, 8, 1)
    assert (start["device"], start["precision"], start["backend"]) == ("cpu", "fp32", "torch")
    assert start["head"] == "3 experts, learned gating, top1 expert pooling"
    assert start["trains"] == "backbone and head"
    assert start["output_dir"] == str(output)
    (line,) = [message for message in messages if message.startswith("training on scifact:")]
    assert f"{start['training_pairs']} pairs, {start['dev_queries']} dev queries" in line
    assert f"{start['steps_per_epoch']} steps/epoch, 3 steps of batch 8" in line
    assert "cpu fp32" in line and str(output) in line


def test_tensorboard_holds_loss_terms_learning_rates_dev_scores_and_expert_usage(tensorboard_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    output, result, _ = tensorboard_run
    events = EventAccumulator(str(output / "training" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/contrastive", "train/load_balancing", "train/router_z"} <= tags
    assert {"lr/backbone", "lr/head", "dev/dev_ndcg@10"} <= tags
    assert {f"routing/usage_{kind}/expert_{e}" for kind in ("queries", "documents") for e in range(3)} <= tags

    records = log_records(output)
    train = [r for r in records if r["event"] == "train"]
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [
        (r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in train
    ]
    assert [e.value for e in events.Scalars("lr/head")] == [pytest.approx(r["lr"][1]) for r in train]
    dev = [(e.step, e.value) for e in events.Scalars("dev/dev_ndcg@10")]
    assert dev == [(row["step"], pytest.approx(row["dev_ndcg@10"])) for row in result.dev_history]
    (routing,) = [r for r in records if r["event"] == "routing"]
    usage = [events.Scalars(f"routing/usage_queries/expert_{e}")[0].value for e in range(3)]
    assert usage == pytest.approx(routing["usage_queries"], abs=1e-6)


def test_reporting_is_not_a_setting_of_the_run(scifact_slice):
    collection = load_collection(scifact_slice)
    plain = run_settings(ModelConfig(), TrainConfig(), collection)
    assert run_settings(ModelConfig(), TrainConfig(report_to="tensorboard"), collection) == plain
