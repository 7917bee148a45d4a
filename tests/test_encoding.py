"""Encoding: order preserved under length sorting, agreement with sentence-transformers, bf16."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sbmoe.config.jobs import EncodeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core import cpu
from sbmoe.core.runtime import autocast, resolve_inference, resolve_precision
from sbmoe.inference.encoding import (
    TextEncoder,
    apply_head_stages,
    encode_pooled,
    encode_texts,
    encoder_runner,
    tokenize,
)
from sbmoe.inference.routing import route
from sbmoe.model.retriever import Retriever

TEXTS = [
    "short",
    "a considerably longer text about vitamin D, bone density and the elderly population " * 3,
    "medium length text on aspirin",
    "",
    "another short one",
]
FP32, BF16 = EncodeConfig(precision="fp32"), EncodeConfig(precision="bf16")


@pytest.fixture(scope="module")
def retriever(tiny_bert_dir):
    torch.manual_seed(0)
    return Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3, max_doc_length=32))


def test_length_sorted_encoding_keeps_input_order(retriever):
    together = encode_texts(retriever, TEXTS, "document", EncodeConfig(encode_batch_size=2, precision="fp32"))
    one_by_one = np.stack([encode_texts(retriever, [t], "document", FP32)[0] for t in TEXTS])
    np.testing.assert_allclose(together, one_by_one, rtol=1e-4, atol=1e-5)


def test_matches_sentence_transformers_encode(retriever):
    retriever.model.max_seq_length = retriever.max_length("document")
    expected = retriever.model.encode(TEXTS, batch_size=2, convert_to_numpy=True)
    np.testing.assert_allclose(encode_texts(retriever, TEXTS, "document", FP32), expected, atol=1e-5)


def test_query_and_document_limits_differ(tiny_bert_dir):
    torch.manual_seed(0)
    r = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0, max_query_length=4))
    long_text = [TEXTS[1]]
    assert not np.allclose(encode_texts(r, long_text, "query"), encode_texts(r, long_text, "document"))


def test_bf16_agrees_with_fp32(retriever):
    fp32 = encode_texts(retriever, TEXTS, "document", FP32)
    bf16 = encode_texts(retriever, TEXTS, "document", BF16)
    cosine = (fp32 * bf16).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(bf16, axis=1)
    assert cosine.min() > 0.99


def test_bf16_encoding_leaves_the_float32_weights_untouched(retriever):
    before = {name: tensor.clone() for name, tensor in retriever.model.state_dict().items()}
    encode_texts(retriever, TEXTS, "document", BF16)
    after = retriever.model.state_dict()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype
        assert torch.equal(after[name], tensor), name


def test_auto_precision_falls_back_to_fp32_without_fast_bf16(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: False)
    assert resolve_precision("auto", "cpu") == "fp32"
    monkeypatch.setattr(cpu, "cpu_has_fast_bf16", lambda: True)
    assert resolve_precision("auto", "cpu") == "bf16"
    assert resolve_precision("fp32", "cpu") == "fp32"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8", "cpu")


def test_head_applied_to_pooled_embeddings_equals_full_encode(retriever):
    full = encode_texts(retriever, TEXTS, "document", FP32)
    pooled = encode_pooled(retriever, TEXTS, "document", FP32)
    np.testing.assert_allclose(apply_head_stages(retriever, pooled, "document"), full, rtol=1e-5, atol=1e-6)
    retriever.head.expert_pooling = "all"
    try:
        full_all = encode_texts(retriever, TEXTS, "document", FP32)
    finally:
        retriever.head.expert_pooling = "top1"
    np.testing.assert_allclose(
        apply_head_stages(retriever, pooled, "document", rule="all"), full_all, rtol=1e-5, atol=1e-6
    )
    assert retriever.head.expert_pooling == "top1"  # restored


def test_empty_input_gives_empty_matrix(retriever):
    assert encode_texts(retriever, [], "query").shape == (0, 32)


@pytest.mark.parametrize("training", [True, False])
def test_encoding_runs_in_eval_mode_and_keeps_the_models_mode(retriever, training):
    retriever.model.train(training)
    try:
        # Dropout and the head's gate noise are off while encoding, whatever the model's mode.
        first, second = (encode_texts(retriever, TEXTS, "document", FP32) for _ in range(2))
        np.testing.assert_array_equal(first, second)
        assert {module.training for module in retriever.model.modules()} == {training}
    finally:
        retriever.model.eval()


def test_a_runner_kept_across_calls_encodes_as_a_fresh_one(retriever):
    runner = encoder_runner(retriever, BF16)  # bf16 weight copies made once
    plan = resolve_inference(BF16.backend, BF16.precision, retriever.device)
    with torch.inference_mode(), autocast(plan.precision, retriever.device):
        kept = [runner(tokenize(retriever, [text], "query"))["sentence_embedding"] for text in TEXTS]
    fresh = [encode_pooled(retriever, [text], "query", BF16) for text in TEXTS]
    np.testing.assert_array_equal(torch.cat(kept).float().numpy(), np.concatenate(fresh))


def test_threads_encoding_with_one_training_mode_model_all_get_eval_mode(tiny_bert_dir):
    """A service's worker and a caller encode with one model: neither may see training mode
    (dropout, gate noise) restored by the other in the middle of its encoding."""
    import threading

    torch.manual_seed(0)
    model = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3), device="cpu")
    model.model.train()
    expected = encode_texts(model, TEXTS * 4, "query", FP32)
    results: list = []

    def encode() -> None:
        results.extend(encode_texts(model, TEXTS * 4, "query", FP32) for _ in range(15))

    threads = [threading.Thread(target=encode) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 45 and model.model.training  # its own mode back once all are done
    for result in results:
        np.testing.assert_allclose(result, expected, atol=1e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_the_single_text_encoder_is_the_librarys_and_repeats_its_bytes(retriever, precision):
    config = EncodeConfig(backend="torch", precision=precision, device="cpu")
    encoder = TextEncoder(retriever, config)
    texts = ["aspirin and the heart", "zinc deficiency " * 20]
    pooled = encode_pooled(retriever, texts, "query", config)
    for n, text in enumerate(texts):
        first = encoder(text, "query")
        np.testing.assert_allclose(first.pooled[0], pooled[n], atol=1e-5 if precision == "fp32" else 2e-2)
        np.testing.assert_array_equal(first.embedding, apply_head_stages(retriever, first.pooled, "query"))
        experts, gates = route(retriever, first.pooled)
        assert (first.expert, first.gate) == (int(experts[0]), gates[0].tolist())
        again = encoder(text, "query")
        assert (again.pooled.tobytes(), again.embedding.tobytes()) == (
            first.pooled.tobytes(),
            first.embedding.tobytes(),
        )


def test_bf16_weight_copies_follow_every_change_of_the_weights(tiny_bert_dir):
    """The bf16 copies are kept between calls, and remade when training or a load changes a weight."""
    torch.manual_seed(0)
    config = ModelConfig(backbone=str(tiny_bert_dir), num_experts=3, max_doc_length=32)
    retriever, twin = Retriever.from_config(config), Retriever.from_config(config)
    twin.model.load_state_dict(retriever.model.state_dict())
    first = encode_texts(retriever, TEXTS, "document", BF16)
    np.testing.assert_array_equal(encode_texts(retriever, TEXTS, "document", BF16), first)
    with torch.no_grad():  # in place, as an optimiser's step
        for parameter in retriever.model.parameters():
            parameter.mul_(0.5)
    stepped = encode_texts(retriever, TEXTS, "document", BF16)
    twin.model.load_state_dict(retriever.model.state_dict())  # a load: copied in place
    np.testing.assert_array_equal(encode_texts(twin, TEXTS, "document", BF16), stepped)
    assert not np.array_equal(stepped, first)
