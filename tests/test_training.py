"""Training: reproducibility, resume, model selection, gate learning, refusals."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from conftest import interrupt_at_step

from sbmoe.config.jobs import JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.core.io import read_json
from sbmoe.core.runtime import seed_everything
from sbmoe.data.beir import BeirCollection, Document, load_collection
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.model.retriever import Retriever
from sbmoe.training.batching import (
    false_negative_mask,
    length_grouped_batches,
    shuffled_batches,
)
from sbmoe.training.negatives import load_negatives
from sbmoe.training.optimization import learning_rate_lambda
from sbmoe.training.trainer import build_trainer, train
from sbmoe.training.training_data import TrainingData

QUIET = JobOptions(show_progress=False)


def configs(tiny_bert_dir, preset="default", model=None, **train_overrides):
    train_values = {"epochs": 1, "batch_size": 8, "precision": "fp32", "checkpoint_steps": None}
    train_values.update(train_overrides)
    model_values = {"backbone": str(tiny_bert_dir), "num_experts": 3, "max_doc_length": 48, **(model or {})}
    return build_configs(preset, model_values, train_values)


def weights(retriever: Retriever) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in retriever.model.state_dict().items()}


def assert_same_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], msg=key)


def test_training_is_reproducible_for_a_seed(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(tiny_bert_dir, max_steps=3, checkpoint_selection="last")
    train(model_config, train_config, collection, tmp_path / "a", QUIET)
    train(model_config, train_config, collection, tmp_path / "b", QUIET)
    assert_same_weights(
        weights(Retriever.load(str(tmp_path / "a"))), weights(Retriever.load(str(tmp_path / "b")))
    )
    log = [json.loads(line) for line in (tmp_path / "a" / "training" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log if r["event"] == "train"] == [1, 2, 3]
    assert all(r["loss"] > 0 for r in log if r["event"] == "train")


def test_resume_after_interruption_matches_an_uninterrupted_run(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(
        tiny_bert_dir, max_steps=5, checkpoint_steps=2, checkpoint_selection="last"
    )
    train(model_config, train_config, collection, tmp_path / "whole", QUIET)

    seed_everything(train_config.seed)
    interrupted = build_trainer(
        Retriever.from_config(model_config),
        collection,
        train_config,
        tmp_path / "resumed",
        QUIET,
    )
    interrupt_at_step(interrupted, 3)  # after the checkpoint at step 2, before step 4
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert read_json(tmp_path / "resumed" / "training" / "checkpoint" / "state.json")["step"] == 2
    assert not (tmp_path / "resumed" / "training" / "done.json").exists()

    result = train(model_config, train_config, collection, tmp_path / "resumed", QUIET)
    assert result.resumed_from_step == 2 and result.steps == 5
    assert_same_weights(
        weights(Retriever.load(str(tmp_path / "whole"))), weights(Retriever.load(str(tmp_path / "resumed")))
    )


def test_best_dev_checkpoint_is_the_saved_model(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(tiny_bert_dir, epochs=2, eval_steps=2)
    result = train(model_config, train_config, collection, tmp_path / "run", QUIET)
    scores = [record["dev_ndcg@10"] for record in result.dev_history]
    assert result.dev_history[0]["step"] == 0  # the starting model competes
    assert len(scores) >= 4
    assert result.best_dev_ndcg10 == max(scores)
    assert result.best_step == result.dev_history[scores.index(max(scores))]["step"]
    saved = Retriever.load(str(tmp_path / "run"))
    best = Retriever.load(str(tmp_path / "run" / "training" / "best"))
    assert saved.fingerprint() == best.fingerprint()
    assert read_json(tmp_path / "run" / "sbmoe.json")["training"]["best_step"] == result.best_step


def test_finished_run_is_not_trained_again(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(tiny_bert_dir, max_steps=2)
    first = train(model_config, train_config, collection, tmp_path / "run", QUIET)
    log_size = (tmp_path / "run" / "training" / "log.jsonl").stat().st_size
    second = train(model_config, train_config, collection, tmp_path / "run", QUIET)
    assert second.steps == first.steps and second.best_step == first.best_step
    assert (tmp_path / "run" / "training" / "log.jsonl").stat().st_size == log_size


def test_checkpoint_from_another_configuration_is_refused(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(tiny_bert_dir, max_steps=4, checkpoint_steps=1)
    trainer = build_trainer(
        Retriever.from_config(model_config), collection, train_config, tmp_path / "run", QUIET
    )
    interrupt_at_step(trainer, 2)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    _, other = configs(tiny_bert_dir, max_steps=4, checkpoint_steps=1, lr_head=0.5)
    with pytest.raises(ValueError, match=r"other settings \(train_config.lr_head 0.001 -> 0.5\)"):
        train(model_config, other, collection, tmp_path / "run", QUIET)


@pytest.mark.parametrize(
    ("gating", "should_change"), [("learned", True), ("paper", False), ("random", False)]
)
def test_gate_learns_only_under_learned_gating(tiny_bert_dir, scifact_slice, tmp_path, gating, should_change):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(
        tiny_bert_dir, model={"gating": gating}, max_steps=3, checkpoint_selection="last", lr_head=1e-2
    )
    seed_everything(0)
    retriever = Retriever.from_config(model_config)
    gate_before = [p.detach().clone() for p in retriever.head.gate.parameters()]
    noise_before = [p.detach().clone() for p in retriever.head.noise.parameters()]
    experts_before = retriever.head.expert_w1.detach().clone()
    build_trainer(retriever, collection, train_config, tmp_path / gating, QUIET).train()
    gate_changed = any(
        not torch.equal(a, b) for a, b in zip(gate_before, retriever.head.gate.parameters(), strict=True)
    )
    noise_changed = any(
        not torch.equal(a, b) for a, b in zip(noise_before, retriever.head.noise.parameters(), strict=True)
    )
    assert gate_changed is should_change
    assert noise_changed is should_change
    assert not torch.equal(experts_before, retriever.head.expert_w1)  # experts learn either way


def test_false_negative_mask_marks_other_relevant_documents():
    qrels = {"q1": {"d1": 1, "d2": 1}, "q2": {"d2": 1}}
    mask = false_negative_mask(["q1", "q2"], ["d1", "d2"], qrels)
    assert mask.tolist() == [[True, True], [False, True]]


def test_linear_schedule_warms_up_then_decays(tiny_bert_dir):
    _, config = configs(tiny_bert_dir, scheduler="linear", warmup_ratio=0.2)
    factor = learning_rate_lambda(config, total_steps=10)
    values = [factor(step) for step in range(10)]
    assert values[0] < values[1] < values[2]  # warm-up over 2 steps
    assert values[2] == pytest.approx(1.0)
    assert values[-1] == pytest.approx(0.125) and values[-1] < values[5]
    _, constant = configs(tiny_bert_dir, scheduler="constant")
    assert {learning_rate_lambda(constant, 10)(s) for s in range(10)} == {1.0}


def test_head_only_on_cached_embeddings_equals_training_through_a_frozen_backbone(
    tiny_bert_dir, scifact_slice, tmp_path
):
    collection = load_collection(scifact_slice)
    trained = {}
    for mode in ("freeze_backbone", "head_only"):
        model_config, train_config = configs(
            tiny_bert_dir, max_steps=4, checkpoint_selection="last", lr_head=1e-2, **{mode: True}
        )
        seed_everything(0)
        retriever = Retriever.from_config(model_config)
        backbone_before = {k: v.clone() for k, v in retriever.model[0].state_dict().items()}
        cache = EmbeddingCache(tmp_path / "cache")
        build_trainer(
            retriever, collection, train_config, tmp_path / mode, JobOptions(show_progress=False, cache=cache)
        ).train()
        assert_same_weights(backbone_before, retriever.model[0].state_dict())  # frozen
        trained[mode] = {k: v.clone() for k, v in retriever.head.state_dict().items()}
    seed_everything(0)
    before = weights(Retriever.from_config(configs(tiny_bert_dir)[0]))
    assert any(not torch.equal(v, before[f"2.{k}"]) for k, v in trained["head_only"].items())  # it learned
    for key in trained["head_only"]:
        torch.testing.assert_close(
            trained["head_only"][key], trained["freeze_backbone"][key], rtol=1e-4, atol=1e-5
        )


def test_head_only_needs_a_head(tiny_bert_dir, scifact_slice, tmp_path):
    model_config, train_config = configs(tiny_bert_dir, model={"num_experts": 0}, head_only=True)
    with pytest.raises(ValueError, match="num-experts"):
        build_trainer(
            Retriever.from_config(model_config), load_collection(scifact_slice), train_config, tmp_path
        )


def test_length_grouped_batches_cover_every_pair_once_with_similar_lengths():
    lengths = [(i * 37) % 101 for i in range(200)]
    order = length_grouped_batches(seed=3, batch_size=8, lengths=lengths, group=5)
    batches = order(0, 200)
    assert sorted(i for batch in batches for i in batch) == list(range(200))
    assert order(0, 200) == batches and order(1, 200) != batches  # seeded, new order each epoch

    def mean_spread(groups):
        return sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in groups) / len(groups)

    assert mean_spread(batches) < 0.5 * mean_spread(shuffled_batches(3, 8)(0, 200))


def test_routing_is_logged_per_epoch_and_collapse_warns(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(
        tiny_bert_dir, max_steps=3, checkpoint_selection="last", collapse_threshold=0.0
    )
    with pytest.warns(RuntimeWarning, match="expert collapse"):
        train(model_config, train_config, collection, tmp_path / "run", QUIET)
    log = [
        json.loads(line) for line in (tmp_path / "run" / "training" / "log.jsonl").read_text().splitlines()
    ]
    routing = [r for r in log if r["event"] == "routing"]
    assert len(routing) == 1
    assert len(routing[0]["usage_queries"]) == 3 and sum(routing[0]["usage_documents"]) == pytest.approx(1.0)
    assert 0.0 <= routing[0]["noisy_clean_agreement"] <= 1.0


def test_symmetric_loss_adds_the_document_to_query_direction(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    losses = {}
    for symmetric in (False, True):
        model_config, train_config = configs(
            tiny_bert_dir, max_steps=1, checkpoint_selection="last", symmetric_loss=symmetric
        )
        seed_everything(0)
        trainer = build_trainer(
            Retriever.from_config(model_config),
            collection,
            train_config,
            tmp_path / str(symmetric),
            QUIET,
        )
        losses[symmetric] = trainer.training_step(trainer.batches(0)[0])["contrastive"]
    assert losses[True] != pytest.approx(losses[False])
    assert losses[True] > 0


def test_cosine_schedule_decays_to_zero(tiny_bert_dir):
    _, config = configs(tiny_bert_dir, scheduler="cosine", warmup_ratio=0.0)
    factor = learning_rate_lambda(config, total_steps=10)
    assert factor(0) == pytest.approx(1.0)
    assert factor(5) == pytest.approx(0.5)
    assert factor(10) == pytest.approx(0.0, abs=1e-12)


def test_training_with_mined_hard_negatives(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    model_config, train_config = configs(
        tiny_bert_dir, max_steps=2, checkpoint_selection="last", hard_negatives=2, negatives_source="bm25"
    )
    seed_everything(0)
    trainer = build_trainer(
        Retriever.from_config(model_config), collection, train_config, tmp_path / "run", QUIET
    )
    saved = load_negatives(tmp_path / "run" / "training" / "negatives.json")
    assert saved == trainer.data.negatives and saved
    batch = trainer.batches(0)[0]
    query_ids = [trainer.data.pairs[i][0] for i in batch]
    picked = trainer.data.hard_negatives(query_ids, trainer.step)
    assert len(picked) == 2 * len(query_ids)
    for position, query_id in enumerate(query_ids):
        assert not {
            d
            for d in picked[2 * position : 2 * position + 2]
            if trainer.data.train_qrels[query_id].get(d, 0) > 0
        }
    terms = trainer.training_step(batch)
    assert terms["contrastive"] > 0
    result = trainer.train()
    assert result.steps == 2


def test_pick_negatives_is_deterministic_rotates_and_tops_up():
    pool = ["a", "b", "c", "d", "e", "pos"]
    collection = BeirCollection("t", Path("t"), {d: Document(d, d) for d in pool}, {"q": "q", "r": "r"}, {})
    qrels = {"q": {"pos": 1}, "r": {"pos": 1}}
    data = TrainingData(collection, qrels, {}, [("q", "pos")], {"q": ["a", "b", "c"]}, 2, seed=1)
    first = data.pick_negatives("q", step=0)
    assert first == data.pick_negatives("q", step=0)
    assert set(first) <= {"a", "b", "c"} and len(set(first)) == 2
    one = dataclasses.replace(data, negatives_per_query=1)
    steps = {tuple(one.pick_negatives("q", step)) for step in range(20)}
    assert len(steps) > 1  # rotates over steps
    topped = dataclasses.replace(data, negatives_per_query=3).pick_negatives("r", 0)
    assert len(topped) == 3 and "pos" not in topped


def test_load_balancing_lowers_the_spread_of_expert_usage(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    max_share, entropy = {}, {}
    for coef in (0.0, 1.0):
        model_config, train_config = configs(
            tiny_bert_dir,
            model={"num_experts": 4, "noisy_gating": False},
            epochs=8,
            checkpoint_selection="last",
            lr_head=5e-3,
            load_balancing_coef=coef,
            router_z_loss_coef=0.0,
            head_only=True,
            collapse_threshold=1.0,
        )
        seed_everything(0)
        build_trainer(
            Retriever.from_config(model_config),
            collection,
            train_config,
            tmp_path / str(coef),
            JobOptions(show_progress=False, cache=EmbeddingCache(tmp_path / "cache")),
        ).train()
        log = [
            json.loads(line)
            for line in (tmp_path / str(coef) / "training" / "log.jsonl").read_text().splitlines()
        ]
        last = [r for r in log if r["event"] == "routing"][-1]
        max_share[coef] = max(last["usage_queries"] + last["usage_documents"])
        entropy[coef] = last["entropy_queries"] + last["entropy_documents"]
    assert max_share[1.0] < max_share[0.0]
    assert entropy[1.0] > entropy[0.0]
