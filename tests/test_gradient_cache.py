"""Gradient caching: chunked embedding gives the gradients of one pass over the whole batch."""

from __future__ import annotations

import pytest
import torch

from sbmoe.config.jobs import JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.core.runtime import seed_everything
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.training.gradient_cache import GradientCache
from sbmoe.training.trainer import build_trainer


def gradients_after_two_steps(
    tiny_bert_dir, collection, output_dir, chunk_size: int, dropout: bool, noisy_gating: bool
) -> dict[str, torch.Tensor]:
    model_config, train_config = build_configs(
        "default",
        {
            "backbone": str(tiny_bert_dir),
            "num_experts": 3,
            "max_doc_length": 48,
            "noisy_gating": noisy_gating,
        },
        {
            "batch_size": 8,
            "precision": "fp32",
            "checkpoint_steps": None,
            "checkpoint_selection": "last",
            "hard_negatives": 1,
            "grad_cache_chunk_size": chunk_size,
        },
    )
    seed_everything(0)
    retriever = Retriever.from_config(model_config)
    if not dropout:
        for module in retriever.model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    trainer = build_trainer(retriever, collection, train_config, output_dir, JobOptions(show_progress=False))
    gradients = {}

    def keep_gradients(*_) -> None:  # as the optimiser sees them (the step sets them to None after)
        gradients.clear()
        gradients.update(
            (name, parameter.grad.clone())
            for name, parameter in retriever.model.named_parameters()
            if parameter.grad is not None
        )

    trainer.optimizer.register_step_pre_hook(keep_gradients)
    for batch in trainer.batches(0)[:2]:
        trainer.training_step(batch)
    return gradients


def assert_same_gradients(first: dict, second: dict, atol: float) -> None:
    assert first.keys() == second.keys()
    assert any(name.startswith("0.") for name in first)  # the backbone learns too
    assert any("gate" in name for name in first)  # and the router, through the auxiliary losses
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=atol, msg=name)


def test_one_chunk_replays_dropout_and_gate_noise_exactly(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    plain = gradients_after_two_steps(tiny_bert_dir, collection, tmp_path / "a", 0, True, True)
    cached = gradients_after_two_steps(tiny_bert_dir, collection, tmp_path / "b", 64, True, True)
    assert_same_gradients(plain, cached, atol=1e-7)


def test_small_chunks_give_the_whole_batch_gradients(tiny_bert_dir, scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    plain = gradients_after_two_steps(tiny_bert_dir, collection, tmp_path / "a", 0, False, False)
    cached = gradients_after_two_steps(tiny_bert_dir, collection, tmp_path / "b", 3, False, False)
    assert_same_gradients(plain, cached, atol=1e-6)


def test_chunks_without_replayed_randomness_would_differ(tiny_bert_dir, scifact_slice, tmp_path):
    # The control for the first test: with dropout, chunking changes the masks drawn, so the
    # gradients differ; exact equality above comes from replaying each chunk's random state.
    collection = load_collection(scifact_slice)
    plain = gradients_after_two_steps(tiny_bert_dir, collection, tmp_path / "a", 0, True, True)
    cached = gradients_after_two_steps(tiny_bert_dir, collection, tmp_path / "b", 3, True, True)
    with pytest.raises(AssertionError):
        assert_same_gradients(plain, cached, atol=1e-6)


def test_chunk_size_must_be_positive():
    with pytest.raises(ValueError, match="chunk_size"):
        GradientCache(torch.nn.Identity(), 0)
