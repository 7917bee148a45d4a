"""Building, saving, reloading and fingerprinting retrievers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import minilm_path
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.errors import ModelLoadError
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.backbones import resolve_backbone
from sbmoe.model.moe_head import MoEHead
from sbmoe.model.retriever import Retriever

TEXTS = [
    "Vitamin D deficiency is linked to depression.",
    "a b c",
    "Aspirin lowers the risk of stroke in adults.",
]


def tiny(tiny_bert_dir, **overrides) -> Retriever:
    torch.manual_seed(0)
    return Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), **overrides))


def test_pipeline_stages_follow_the_config(tiny_bert_dir):
    retriever = tiny(tiny_bert_dir, num_experts=3, similarity="cosine")
    names = [type(m).__name__ for m in retriever.model.children()]
    assert names == ["Transformer", "Pooling", "MoEHead", "Normalize"]
    assert retriever.head.num_experts == 3 and retriever.head.normalize_input
    baseline = tiny(tiny_bert_dir, num_experts=0, similarity="dot")
    assert [type(m).__name__ for m in baseline.model.children()] == ["Transformer", "Pooling"]
    assert baseline.head is None


def test_plain_transformer_defaults_to_mean_pooling_cosine_and_its_own_token_limit(tiny_bert_dir):
    retriever = tiny(tiny_bert_dir)
    assert retriever.config.pooling == "mean"
    assert retriever.config.similarity == "cosine"
    # 128 position embeddings: documents and queries both stop there (256 would not even run).
    assert retriever.config.max_doc_length == retriever.config.max_query_length == 128


def test_sentence_transformers_backbone_keeps_its_own_settings():
    retriever = Retriever.from_config(ModelConfig(backbone="all-MiniLM-L6-v2", num_experts=2))
    assert retriever.config.similarity == "cosine"  # MiniLM ships a Normalize module
    assert retriever.config.pooling == "mean"
    assert retriever.config.max_doc_length == 256  # its sentence_bert_config max_seq_length
    assert retriever.config.max_query_length == 256  # queries too, unless a preset says otherwise


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_pooling_override(tiny_bert_dir, pooling):
    assert tiny(tiny_bert_dir, pooling=pooling).config.pooling == pooling


def test_save_then_sentence_transformers_reloads_same_embeddings(tiny_bert_dir, tmp_path):
    retriever = tiny(tiny_bert_dir, num_experts=4, gating="learned", expert_pooling="all")
    retriever.save(tmp_path / "model")
    expected = encode_texts(retriever, TEXTS, "document", EncodeConfig(precision="fp32"))
    reloaded = SentenceTransformer(str(tmp_path / "model"), trust_remote_code=True, device="cpu")
    assert isinstance(reloaded[2], MoEHead)
    got = reloaded.encode(TEXTS, convert_to_numpy=True)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_retriever_load_round_trip_keeps_config_and_fingerprint(tiny_bert_dir, tmp_path):
    retriever = tiny(tiny_bert_dir, num_experts=2, lowercase=True, max_query_length=16)
    retriever.save(tmp_path / "model", extra={"note": "kept"})
    loaded = Retriever.load(str(tmp_path / "model"))
    assert loaded.config == retriever.config
    assert loaded.fingerprint() == retriever.fingerprint()
    np.testing.assert_allclose(
        encode_texts(loaded, TEXTS, "query", EncodeConfig(precision="fp32")),
        encode_texts(retriever, TEXTS, "query", EncodeConfig(precision="fp32")),
        rtol=1e-5,
        atol=1e-6,
    )


def test_save_keeps_unrelated_entries_and_replaces_old_model(tiny_bert_dir, tmp_path):
    target = tmp_path / "model"
    (target / "training").mkdir(parents=True)
    (target / "training" / "log.jsonl").write_text("{}\n")
    tiny(tiny_bert_dir, num_experts=2).save(target)
    tiny(tiny_bert_dir, num_experts=0).save(target)  # a model without head overwrites it
    assert (target / "training" / "log.jsonl").read_text() == "{}\n"
    assert Retriever.load(str(target)).head is None
    assert not [p for p in target.iterdir() if p.name.endswith(".tmp")]


def test_fingerprint_tracks_weights_and_inference_rule(tiny_bert_dir):
    retriever = tiny(tiny_bert_dir, num_experts=2)
    before = retriever.fingerprint()
    assert retriever.fingerprint() == before
    retriever.head.expert_pooling = "all"
    assert retriever.fingerprint() != before
    retriever.head.expert_pooling = "top1"
    with torch.no_grad():
        retriever.head.expert_b2.add_(1e-3)
    assert retriever.fingerprint() != before


def test_parameter_groups_split_backbone_and_head(tiny_bert_dir):
    retriever = tiny(tiny_bert_dir, num_experts=2)
    backbone, head = retriever.parameter_groups()
    assert {id(p) for p in head} == {id(p) for p in retriever.head.parameters()}
    assert len(backbone) + len(head) == len(list(retriever.model.parameters()))


def test_minilm_name_resolves_to_the_offline_copy():
    assert resolve_backbone("all-MiniLM-L6-v2") == minilm_path()
    assert resolve_backbone("sentence-transformers/all-MiniLM-L6-v2") == minilm_path()


def test_missing_local_directory_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_backbone("./no/such/model")


def test_unreachable_hub_name_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    # Offline mode makes the hub unreachable at once (instead of after a minute of retries).
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelLoadError, match=r"could not load 'huawei-noah/TinyBERT_General_4L_312D'.*hub"):
        Retriever.from_config(ModelConfig(backbone="huawei-noah/TinyBERT_General_4L_312D"))


def test_hub_id_of_a_pushed_sbmoe_model_loads_from_the_hub_cache(tiny_bert_dir, tmp_path, monkeypatch):
    """A hub repository holding a saved sbmoe model loads by its id (here from the offline cache)."""
    import shutil

    from huggingface_hub import constants

    retriever = tiny(tiny_bert_dir, num_experts=2)
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-sbmoe"
    retriever.save(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    loaded = Retriever.load("someone/tiny-sbmoe", device="cpu")
    assert loaded.fingerprint() == retriever.fingerprint() and loaded.head.num_experts == 2

    shutil.rmtree(repo)  # not in the cache and no network: a plain-encoder load that fails in one line
    with pytest.raises(ModelLoadError, match="someone/tiny-sbmoe"):
        Retriever.load("someone/tiny-sbmoe", device="cpu")
