"""The ONNX Runtime backend and what ``--backend auto`` picks on each kind of machine."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.core import cpu
from sbmoe.core.errors import UsageError
from sbmoe.core.runtime import resolve_inference, resolve_one_text_inference
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import TextEncoder, encode_texts
from sbmoe.inference.onnx_backend import export_transformer
from sbmoe.model.retriever import Retriever

TEXTS = [
    "Vitamin D deficiency is associated with depression in older adults.",
    "short",
    "Randomised trials of statins show reduced cardiovascular events over five years of follow-up.",
    "The cell cycle checkpoint kinase responds to DNA damage.",
]


@pytest.fixture(scope="module")
def retriever(tiny_bert_dir):
    torch.manual_seed(0)
    config = ModelConfig(backbone=str(tiny_bert_dir), num_experts=3, expert_pooling="all", max_doc_length=32)
    return Retriever.from_config(config, device="cpu")


def test_onnx_fp32_computes_what_torch_computes(retriever):
    torch_fp32 = encode_texts(retriever, TEXTS, "document", EncodeConfig(backend="torch", precision="fp32"))
    onnx_fp32 = encode_texts(retriever, TEXTS, "document", EncodeConfig(backend="onnx", precision="fp32"))
    np.testing.assert_allclose(onnx_fp32, torch_fp32, atol=2e-5)
    queries = encode_texts(retriever, TEXTS[:2], "query", EncodeConfig(backend="onnx", precision="fp32"))
    assert queries.shape == (2, torch_fp32.shape[1])


def test_onnx_int8_stays_close_to_fp32(retriever):
    fp32 = encode_texts(retriever, TEXTS, "document", EncodeConfig(backend="torch", precision="fp32"))
    int8 = encode_texts(retriever, TEXTS, "document", EncodeConfig(backend="onnx", precision="int8"))
    assert not np.array_equal(int8, fp32)  # it is quantised...
    cosine = np.sum(int8 * fp32, axis=1) / np.linalg.norm(int8, axis=1) / np.linalg.norm(fp32, axis=1)
    assert cosine.min() > 0.95  # ...but close (a random tiny BERT; the real MiniLM is in test_integration)


def test_export_is_made_once_per_weights_and_precision(retriever, tmp_path):
    first = export_transformer(retriever, "fp32", tmp_path)
    modified = first.stat().st_mtime_ns
    assert export_transformer(retriever, "fp32", tmp_path) == first
    assert first.stat().st_mtime_ns == modified  # reused, not rebuilt
    assert export_transformer(retriever, "int8", tmp_path) != first
    other = Retriever.from_config(ModelConfig(backbone=str(retriever.config.backbone), num_experts=0), "cpu")
    with torch.no_grad():
        next(other.encoder_stages()[0].parameters()).add_(0.01)
    assert export_transformer(other, "fp32", tmp_path).parent != first.parent
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left


def test_cache_entries_are_kept_apart_by_backend(retriever, tmp_path):
    cache = EmbeddingCache(tmp_path / "cache")
    encode_texts(
        retriever,
        TEXTS,
        "document",
        EncodeConfig(backend="torch", precision="fp32"),
        options=JobOptions(show_progress=False, cache=cache),
    )
    encode_texts(
        retriever,
        TEXTS,
        "document",
        EncodeConfig(backend="onnx", precision="fp32"),
        options=JobOptions(show_progress=False, cache=cache),
    )
    assert len(list((tmp_path / "cache").glob("*.npy"))) == 2


@pytest.mark.parametrize(
    ("flags", "onnxruntime", "expected"),
    [
        ({"avx2", "avx512f", "amx_bf16"}, True, ("torch", "bf16")),  # Xeon with AMX
        # AVX2-only EPYC or laptop: float32, since int8's embeddings depend on their batch
        ({"avx2", "fma"}, True, ("torch", "fp32")),
        ({"avx2", "fma"}, False, ("torch", "fp32")),
        ({"neon"}, True, ("torch", "fp32")),
    ],
)
def test_auto_picks_per_machine(monkeypatch, flags, onnxruntime, expected):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object() if onnxruntime else None)
    plan = resolve_inference("auto", "auto", "cpu")
    assert (plan.backend, plan.precision) == expected
    assert plan.reason  # says why


@pytest.mark.parametrize(
    ("flags", "asked", "expected"),
    [
        ({"avx512f", "avx512_bf16", "amx_bf16"}, ("auto", "auto"), ("onnx", "fp32")),  # Xeon with AMX
        ({"avx512f", "avx512_bf16"}, ("auto", "auto"), ("onnx", "fp32")),  # EPYC with AVX512-BF16
        ({"avx2", "fma"}, ("auto", "auto"), ("onnx", "fp32")),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, ("torch", "bf16"), ("torch", "bf16")),  # asked for: kept
        ({"avx512f", "avx512_bf16"}, ("auto", "fp32"), ("torch", "fp32")),
        ({"avx2", "fma"}, ("onnx", "int8"), ("onnx", "int8")),
    ],
)
def test_one_text_at_a_time_takes_onnx_fp32_on_a_cpu_unless_asked(
    retriever, monkeypatch, flags, asked, expected
):
    monkeypatch.setattr(cpu, "cpu_flags", lambda: frozenset(flags))
    plan = resolve_one_text_inference(*asked, "cpu")
    assert (plan.backend, plan.precision) == expected
    # The server's encoder (and its /info) take this plan.
    config = EncodeConfig(backend=asked[0], precision=asked[1], device="cpu")
    assert TextEncoder(retriever, config).plan == plan


def test_one_text_at_a_time_without_onnxruntime_is_what_a_batch_takes(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert resolve_one_text_inference("auto", "auto", "cpu") == resolve_inference("auto", "auto", "cpu")


def test_a_model_onnx_cannot_run_is_encoded_by_torch_under_auto(retriever, monkeypatch, caplog):
    import sbmoe.inference.onnx_backend as onnx_backend

    def unexportable(*args, **kwargs):
        raise RuntimeError("Unsupported: an operator this exporter does not know")

    monkeypatch.setattr(onnx_backend, "export_transformer", unexportable)
    encoder = TextEncoder(retriever, EncodeConfig(device="cpu"))
    assert encoder.plan == resolve_inference("auto", "auto", "cpu")
    assert "could not set up ONNX Runtime for this model (RuntimeError: Unsupported" in caplog.text
    expected = encode_texts(retriever, [TEXTS[0]], "query", EncodeConfig(device="cpu"))
    np.testing.assert_array_equal(encoder(TEXTS[0], "query").embedding, expected)
    caplog.clear()
    for backend, precision in (("onnx", "fp32"), ("auto", "int8")):  # asked for: the failure is the answer
        with pytest.raises(RuntimeError, match="Unsupported"):
            TextEncoder(retriever, EncodeConfig(backend=backend, precision=precision, device="cpu"))
    assert "could not set up" not in caplog.text  # no fallback promised, none tried


def test_explicit_choices_are_kept_and_impossible_ones_refused():
    assert resolve_inference("torch", "fp32", "cpu").key == "fp32"
    assert resolve_inference("onnx", "fp32", "cpu").key == "onnx-fp32"
    assert resolve_inference("auto", "int8", "cpu").key == "onnx-int8"
    with pytest.raises(UsageError, match="int8 runs on --backend onnx"):
        resolve_inference("torch", "int8", "cpu")
    with pytest.raises(UsageError, match="bf16 runs on --backend torch"):
        resolve_inference("onnx", "bf16", "cpu")
    with pytest.raises(UsageError, match="backend"):
        resolve_inference("tensorrt", "auto", "cpu")


def test_index_records_the_backend_and_precision_that_made_it(tiny_bert_dir, scifact_slice, tmp_path, capsys):
    from sbmoe.cli.main import main
    from sbmoe.core.io import read_json

    model_dir = tmp_path / "model"
    Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=2), device="cpu").save(
        model_dir
    )
    index_dir = tmp_path / "index"
    common = ["--model", str(model_dir), "--backend", "onnx", "--precision", "int8"]
    assert main(["-q", "index", *common, "--data", str(scifact_slice), "--output", str(index_dir)]) == 0
    capsys.readouterr()
    encoding = read_json(index_dir / "meta.json")["metadata"]["encoding"]
    assert (encoding["backend"], encoding["precision"]) == ("onnx", "int8")
    assert main(["-q", "search", *common, "--index", str(index_dir), "--query", "cells", "--top-k", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 3


def test_an_export_killed_midway_is_cleaned_up_by_the_next_one(retriever, tmp_path):
    import subprocess
    import sys

    from sbmoe.inference.onnx_backend import EXPORT_VERSION

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    name = f"{retriever.transformer_fingerprint()[:32]}-fp32-v{EXPORT_VERSION}"
    killed = tmp_path / f".{name}.{dead.stdout.strip()}.abcdefgh.tmp"
    running = tmp_path / f".{name}.{os.getpid()}.ijklmnop.tmp"  # a live owner: left alone
    for folder in (killed, running):
        folder.mkdir()
        (folder / "fp32.onnx").write_bytes(b"half an export")
    export_transformer(retriever, "fp32", tmp_path)
    assert not killed.exists() and running.exists()


def test_what_auto_picks_here_embeds_a_text_alike_alone_and_in_a_batch(retriever):
    """``auto`` keeps one model one function: a text's embedding does not depend on its batch."""
    texts = [*TEXTS, "a much longer text " * 20, "short"]
    auto = EncodeConfig(device="cpu")
    batch = encode_texts(retriever, texts, "query", auto)
    alone = np.stack([encode_texts(retriever, [text], "query", auto)[0] for text in texts])
    np.testing.assert_allclose(alone, batch, atol=2e-3 if cpu.cpu_has_fast_bf16() else 1e-5)


def test_two_threads_exporting_at_once_get_the_same_model(retriever, tmp_path, monkeypatch):
    """A service's worker and a caller may both need the export first: tracing is serialised."""
    import threading

    int8 = EncodeConfig(backend="onnx", precision="int8", device="cpu")
    monkeypatch.setenv("SBMOE_CACHE_DIR", str(tmp_path / "together"))
    results: list = [None, None]

    def encode(slot: int) -> None:
        results[slot] = encode_texts(retriever, TEXTS, "query", int8)

    threads = [threading.Thread(target=encode, args=(slot,)) for slot in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    monkeypatch.setenv("SBMOE_CACHE_DIR", str(tmp_path / "alone"))
    expected = encode_texts(retriever, TEXTS, "query", int8)
    for result in results:
        np.testing.assert_array_equal(result, expected)
