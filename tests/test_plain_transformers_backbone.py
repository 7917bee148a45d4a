"""The plain-``transformers`` backbone path on a real checkpoint: ``../shared/models/splade-tiny``.

Users name hub backbones that are bare ``transformers`` folders (TinyBERT, ``bert-base-uncased``,
Contriever): a ``config.json``, weights and a tokenizer, no ``modules.json``, no pooling. The
stand-in here is splade-tiny (BERT-Tiny shape: 2 layers, hidden 128; ``BertForMaskedLM`` weights,
a fast tokenizer only). Read from ``$SBMOE_SPLADE_TINY`` or ``../shared/models/splade-tiny`` beside
the repository, as the collections are read from ``$SBMOE_DATA_DIR`` or ``../shared/data``.

One test, end to end: load the folder, check its zero-shot embeddings against a hand-written
``transformers`` mean pooling, fine-tune backbone and MoE head a few steps, save, and reload the
saved folder in sbmoe and in plain sentence-transformers with the same embeddings.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, write_beir_slice
from safetensors.torch import load_file
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.data.beir import load_collection
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.moe_head import MoEHead
from sbmoe.model.retriever import Retriever
from sbmoe.training.trainer import train

pytestmark = pytest.mark.integration

SPLADE_TINY = Path(os.environ.get("SBMOE_SPLADE_TINY") or REPO.parent / "shared" / "models" / "splade-tiny")
FP32 = EncodeConfig(device="cpu", precision="fp32", backend="torch")


@pytest.fixture(scope="module")
def splade_tiny() -> Path:
    if not (SPLADE_TINY / "config.json").exists():
        pytest.skip(f"splade-tiny not found at {SPLADE_TINY} (set SBMOE_SPLADE_TINY)")
    return SPLADE_TINY


def mean_pooled(folder: Path, texts: list[str], max_length: int) -> np.ndarray:
    """What a plain ``transformers`` user computes: masked mean of the last layer, L2-normalised."""
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1).numpy()


def test_a_plain_transformers_folder_fine_tunes_with_an_moe_head_and_reloads_everywhere(
    splade_tiny, data_dir, tmp_path
):
    collection = load_collection(write_beir_slice(data_dir / "scifact", tmp_path / "scifact", 48, 8, 40))
    texts = [doc.full_text for doc in list(collection.corpus.values())[:6]]
    queries = [collection.queries[q] for q in list(collection.queries)[:4]]

    # Zero-shot: sbmoe's defaults for a bare transformers folder are mean pooling, cosine and the
    # backbone's own 512-token limit, i.e. exactly the hand-written pooling above.
    backbone = Retriever.load(str(splade_tiny), device="cpu")
    assert backbone.head is None
    assert (backbone.config.pooling, backbone.config.similarity) == ("mean", "cosine")
    assert backbone.config.max_doc_length == 512
    zero_shot = encode_texts(backbone, texts, "document", FP32)
    np.testing.assert_allclose(zero_shot, mean_pooled(splade_tiny, texts, 512), atol=1e-5)

    # Full fine-tuning (backbone + a 3-expert SB-MoE head), a few steps, saved as a folder.
    model_config, train_config = build_configs(
        "default",
        {"backbone": str(splade_tiny), "num_experts": 3, "max_doc_length": 64, "expert_pooling": "all"},
        {
            "max_steps": 4,
            "batch_size": 8,
            "lr_backbone": 1e-3,
            "dev_max_docs": 30,
            "checkpoint_selection": "last",
            "checkpoint_steps": None,
            "precision": "fp32",
            "seed": 7,
        },
    )
    output = tmp_path / "model"
    result = train(model_config, train_config, collection, output, JobOptions(show_progress=False))
    assert result.steps == 4

    # The saved folder is a sentence-transformers pipeline whose transformer is the fine-tuned
    # backbone (BERT-Tiny shape, every layer changed) and whose third stage is the MoE head.
    modules = json.loads((output / "modules.json").read_text(encoding="utf-8"))
    assert [m["type"].rsplit(".", 1)[-1] for m in modules][:3] == ["Transformer", "Pooling", "MoEHead"]
    saved_config = json.loads((output / "config.json").read_text(encoding="utf-8"))
    assert (saved_config["hidden_size"], saved_config["num_hidden_layers"]) == (128, 2)
    before = load_file(str(splade_tiny / "model.safetensors"))
    after = load_file(str(output / "model.safetensors"))
    layer = "encoder.layer.1.attention.self.query.weight"
    original = before.get(layer, before.get(f"bert.{layer}"))
    assert original is not None and after[layer].shape == original.shape
    assert not torch.allclose(after[layer], original), "the backbone was not fine-tuned"

    # Reloaded in sbmoe: the head is back and the embeddings moved away from zero-shot.
    trained = Retriever.load(str(output), device="cpu")
    assert isinstance(trained.head_module, MoEHead) and trained.head_module.num_experts == 3
    ours_docs = encode_texts(trained, texts, "document", FP32)
    ours_queries = encode_texts(trained, queries, "query", FP32)
    assert np.abs(ours_docs - encode_texts(backbone, texts, "document", FP32)).max() > 1e-3

    # Reloaded in plain sentence-transformers: the same embeddings, queries and documents.
    plain = SentenceTransformer(str(output), device="cpu", trust_remote_code=True)
    assert isinstance(plain[2], MoEHead)
    np.testing.assert_allclose(plain.encode(texts, convert_to_numpy=True), ours_docs, atol=1e-5)
    np.testing.assert_allclose(plain.encode(queries, convert_to_numpy=True), ours_queries, atol=1e-5)
