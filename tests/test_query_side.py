"""A query-side head: documents stay the backbone's, so an index built with the backbone stays valid.

Real SciFact slice, a tiny random BERT with the real tokenizer; training is head-only on cached
pooled embeddings, as a query-side head always trains.
"""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import pytest
import torch
from conftest import load_service, search_saved
from sentence_transformers import SentenceTransformer

import sbmoe.inference.encoding as encoding
from sbmoe.cli.main import main
from sbmoe.config.jobs import EncodeConfig, IndexConfig, JobOptions, SearchConfig
from sbmoe.config.model import ModelConfig
from sbmoe.config.presets import build_configs
from sbmoe.core.errors import UsageError
from sbmoe.data.beir import load_collection
from sbmoe.evaluation.metrics import read_trec_run
from sbmoe.inference.encoding import encode_pooled, encode_texts
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.files import IndexMismatchError
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.search import search_documents
from sbmoe.training.procrustes import orthogonal_map, procrustes_model
from sbmoe.training.trainer import train

FP32 = EncodeConfig(device="cpu", precision="fp32", backend="torch")
ENCODE_FLAGS = ["--precision", "fp32", "--backend", "torch", "--device", "cpu"]
HEADS = {"moe": {"num_experts": 3}, "linear": {"head": "linear"}}


def count_encoded_texts(monkeypatch) -> dict[str, int]:
    """Texts the backbone encodes from now on, by kind (counted where every encoding passes)."""
    encoded = {"query": 0, "document": 0}
    original = encoding._run_batches

    def counting(retriever, texts, kind, *args, **kwargs):
        encoded[kind] += len(texts)
        return original(retriever, texts, kind, *args, **kwargs)

    monkeypatch.setattr(encoding, "_run_batches", counting)
    return encoded


def query_side(tiny_bert_dir, head: str, **overrides) -> Retriever:
    torch.manual_seed(0)
    config = ModelConfig(backbone=str(tiny_bert_dir), head_side="query", **HEADS[head], **overrides)
    return Retriever.from_config(config, device="cpu")


@pytest.fixture(scope="module")
def backbone_index(tiny_bert_dir, scifact_slice, tmp_path_factory):
    """The zero-shot backbone saved, and its index of the slice built through the CLI."""
    root = tmp_path_factory.mktemp("query-side")
    Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu").save(
        root / "backbone"
    )
    command = ["-q", "index", "--model", str(root / "backbone"), "--data", str(scifact_slice)]
    assert main([*command, "--output", str(root / "index"), *ENCODE_FLAGS]) == 0
    return root / "backbone", root / "index"


@pytest.fixture(scope="module")
def adapted(tiny_bert_dir, scifact_slice, backbone_index, tmp_path_factory):
    """A query-side MoE head trained a few steps on the slice."""
    model_config, train_config = build_configs(
        "default",
        {"backbone": str(tiny_bert_dir), "num_experts": 3, "head_side": "query"},
        {
            "max_steps": 6,
            "batch_size": 8,
            "eval_steps": 3,
            "dev_max_docs": 30,
            "checkpoint_selection": "last",
            "checkpoint_steps": None,
            "precision": "fp32",
        },
    )
    assert train_config.head_only  # a query-side head always trains alone
    output = tmp_path_factory.mktemp("query-side") / "adapted"
    train(model_config, train_config, load_collection(scifact_slice), output, JobOptions(show_progress=False))
    return output


@pytest.mark.parametrize("head", sorted(HEADS))
def test_an_untrained_query_side_model_ranks_exactly_as_zero_shot(tiny_bert_dir, scifact_slice, head):
    collection = load_collection(scifact_slice)
    queries = {q: collection.queries[q] for q in sorted(collection.split_qrels("test"))}
    documents = {d: doc.full_text for d, doc in collection.corpus.items()}
    zero_shot = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    model = query_side(tiny_bert_dir, head)
    for kind, texts in (("query", list(queries.values())), ("document", list(documents.values()))):
        mine, theirs = encode_texts(model, texts, kind, FP32), encode_texts(zero_shot, texts, kind, FP32)
        assert mine.tobytes() == theirs.tobytes(), kind  # bit for bit
    config = SearchConfig(top_k=20)
    (adapted_run,) = search_documents(model, queries, documents, config, FP32).values()
    (zero_shot_run,) = search_documents(zero_shot, queries, documents, config, FP32).values()
    assert adapted_run == zero_shot_run


def test_documents_skip_the_head_and_queries_pass_it(tiny_bert_dir):
    model = query_side(tiny_bert_dir, "moe")
    with torch.no_grad():
        model.head.expert_w2.normal_(0, 0.1)
    zero_shot = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    texts = ["vitamin D and depression", "statins in older adults"]
    np.testing.assert_array_equal(
        encode_texts(model, texts, "document", FP32), encode_texts(zero_shot, texts, "document", FP32)
    )
    assert not np.allclose(
        encode_texts(model, texts, "query", FP32), encode_texts(zero_shot, texts, "query", FP32)
    )


def test_plain_sentence_transformers_follows_the_task(tiny_bert_dir, tmp_path):
    model = query_side(tiny_bert_dir, "linear")
    with torch.no_grad():
        model.head_module.linear.weight.normal_(0, 0.1)
    model.save(tmp_path / "model")
    loaded = SentenceTransformer(str(tmp_path / "model"), device="cpu", trust_remote_code=True)
    texts = ["vitamin D and depression", "statins in older adults"]
    np.testing.assert_allclose(
        loaded.encode_query(texts), encode_texts(model, texts, "query", FP32), atol=1e-6
    )
    np.testing.assert_allclose(
        loaded.encode_document(texts), encode_texts(model, texts, "document", FP32), atol=1e-6
    )
    with pytest.raises(ValueError, match="encode_query"):
        loaded.encode(texts)  # which side? never a silent guess


def test_the_backbone_index_serves_an_adapted_model_with_no_document_encoded(
    adapted, backbone_index, scifact_slice, tmp_path, monkeypatch
):
    _, index_dir = backbone_index
    collection = load_collection(scifact_slice)
    queries = {q: collection.queries[q] for q in sorted(collection.split_qrels("test"))}
    model = Retriever.load(str(adapted), device="cpu")
    assert model.config.head_side == "query" and model.head is not None

    # Exact search over the backbone's document embeddings, with the adapted model's queries.
    documents = list(collection.corpus.values())
    doc_embeddings = encode_texts(model, [d.full_text for d in documents], "document", FP32)
    exact = DenseIndex(doc_embeddings, list(collection.corpus), "exact").search(
        encode_texts(model, list(queries.values()), "query", FP32), 10, query_ids=list(queries)
    )

    encoded = count_encoded_texts(monkeypatch)
    run = search_saved(model, index_dir, queries, SearchConfig(top_k=10), FP32)
    assert encoded == {"query": len(queries), "document": 0}
    assert run == exact

    # The CLI, on the same index.
    run_file = tmp_path / "run.trec"
    command = ["-q", "search", "--model", str(adapted), "--index", str(index_dir), "--top-k", "10"]
    command += ["--queries", str(scifact_slice / "queries.jsonl"), "--output", str(run_file)]
    assert main([*command, *ENCODE_FLAGS]) == 0
    cli_run = read_trec_run(run_file)
    for query_id, hits in exact.items():
        assert list(cli_run[query_id]) == list(hits)
        np.testing.assert_allclose(list(cli_run[query_id].values()), list(hits.values()), atol=1e-5)


def test_a_query_side_head_trains_on_the_backbone_index_without_encoding_a_document(
    tiny_bert_dir, adapted, backbone_index, scifact_slice, tmp_path, monkeypatch
):
    """--document-index: the documents' embeddings come out of the index; training otherwise as usual."""
    _, index_dir = backbone_index
    encoded = count_encoded_texts(monkeypatch)
    monkeypatch.setenv("SBMOE_CACHE_DIR", str(tmp_path / "empty-cache"))  # nothing encoded before
    output = tmp_path / "from-index"
    command = ["-q", "train", "--model", str(tiny_bert_dir), "--data", str(scifact_slice)]
    command += ["--num-experts", "3", "--head-side", "query", "--document-index", str(index_dir)]
    command += ["--max-steps", "6", "--batch-size", "8", "--eval-steps", "3", "--dev-max-docs", "30"]
    command += ["--checkpoint-selection", "last", "--precision", "fp32"]
    assert main([*command, "--output", str(output)]) == 0
    assert encoded["document"] == 0 and encoded["query"] > 0  # dev evaluation included

    # The same head as one trained on the encoded corpus (the index holds those very embeddings).
    from_index, from_encoding = (
        Retriever.load(str(output), device="cpu"),
        Retriever.load(str(adapted), device="cpu"),
    )
    for (name, mine), (_, theirs) in zip(
        from_index.head_module.state_dict().items(),
        from_encoding.head_module.state_dict().items(),
        strict=True,
    ):
        torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("index_type", ["hnsw", "ivf"])
def test_documents_read_back_from_any_index_type_equal_the_encoded_ones(
    tiny_bert_dir, backbone_index, scifact_slice, tmp_path, index_type
):
    from sbmoe.retrieval.stored_vectors import stored_document_vectors

    backbone_dir, index_dir = backbone_index
    flat = DenseIndex.load(index_dir)
    rebuilt = DenseIndex(
        flat.vectors(), flat.doc_ids, flat.fingerprint, IndexConfig(index_type=index_type), flat.metadata
    )
    rebuilt.save(tmp_path / index_type)
    wanted = list(reversed(flat.doc_ids))[:50]
    backbone = Retriever.load(str(backbone_dir), device="cpu")
    read = stored_document_vectors(tmp_path / index_type, wanted, backbone.index_fingerprints())
    np.testing.assert_array_equal(read, flat.vectors()[[flat.doc_ids.index(d) for d in wanted]])


def test_training_on_an_index_is_refused_when_it_cannot_hold_the_documents(
    tiny_bert_dir, backbone_index, scifact_slice, tmp_path, capsys
):
    from sbmoe.retrieval.stored_vectors import stored_document_vectors

    backbone_dir, index_dir = backbone_index
    command = ["-q", "train", "--model", str(tiny_bert_dir), "--data", str(scifact_slice)]
    command += ["--max-steps", "1", "--batch-size", "8", "--document-index", str(index_dir)]
    # A symmetric head's documents change; another document encoder's are not in the index.
    assert main([*command, "--num-experts", "3", "--head-only", "--output", str(tmp_path / "a")]) == 2
    assert "a query-side head (--head-side query) with --head-only" in capsys.readouterr().err
    query = [*command, "--num-experts", "3", "--head-side", "query", "--max-doc-length", "16"]
    assert main([*query, "--output", str(tmp_path / "b")]) == 2
    assert "different model" in capsys.readouterr().err
    backbone = Retriever.load(str(backbone_dir), device="cpu")
    with pytest.raises(UsageError, match=r"lacks 1 of the 2 documents wanted \(first: 'not-in-corpus'\)"):
        stored_document_vectors(
            index_dir, ["not-in-corpus", DenseIndex.load(index_dir).doc_ids[0]], backbone.index_fingerprints()
        )
    with pytest.raises(UsageError, match="FAISS index only"):
        stored_document_vectors("milvus:" + str(tmp_path / "store.db"), ["x"], backbone.index_fingerprints())


def test_serve_answers_from_the_backbone_index(adapted, backbone_index, scifact_slice):
    pytest.importorskip("fastapi")
    from sbmoe.serving.http import BackgroundServer, create_app

    _, index_dir = backbone_index
    model = Retriever.load(str(adapted), device="cpu")
    queries = list(load_collection(scifact_slice).queries.values())[:4]
    expected = search_saved(
        model, index_dir, {str(n): q for n, q in enumerate(queries)}, SearchConfig(top_k=10), FP32
    )
    with BackgroundServer(create_app(load_service(adapted, index_dir, encode=FP32))) as running:
        info = json.loads(urllib.request.urlopen(f"{running.url}/info", timeout=60).read())
        assert info["model"]["head_side"] == "query"
        body = json.dumps({"queries": queries, "top_k": 10}).encode()
        asked = urllib.request.Request(f"{running.url}/search", body, {"Content-Type": "application/json"})
        answer = json.loads(urllib.request.urlopen(asked, timeout=60).read())
    for number, result in enumerate(answer["results"]):
        assert [hit["id"] for hit in result["hits"]] == list(expected[str(number)])


def test_a_symmetric_model_or_another_document_encoder_is_still_refused(
    tiny_bert_dir, backbone_index, scifact_slice
):
    _, index_dir = backbone_index
    queries = {"q": "vitamin D"}
    torch.manual_seed(0)
    symmetric = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3), device="cpu")
    with pytest.raises(IndexMismatchError, match="different model"):
        search_saved(symmetric, index_dir, queries, encode=FP32)
    for other in ({"max_doc_length": 16}, {"pooling": "cls"}):
        with pytest.raises(IndexMismatchError):
            search_saved(query_side(tiny_bert_dir, "moe", **other), index_dir, queries, encode=FP32)


def test_an_index_saved_before_document_fingerprints_still_serves_query_side_models(
    tiny_bert_dir, backbone_index, tmp_path
):
    """Indexes written by earlier versions record who built them only: the bare backbone counts."""
    import shutil

    _, index_dir = backbone_index
    old = tmp_path / "old-index"
    shutil.copytree(index_dir, old)
    meta = json.loads((old / "meta.json").read_text())
    del meta["metadata"]["document_fingerprint"]
    (old / "meta.json").write_text(json.dumps(meta))
    search_saved(query_side(tiny_bert_dir, "linear"), old, {"q": "vitamin D"}, encode=FP32)


def test_a_query_side_head_never_trains_the_backbone(tiny_bert_dir):
    with pytest.raises(UsageError, match="query-side head trains alone"):
        build_configs(
            "default", {"backbone": "x", "num_experts": 3, "head_side": "query"}, {"head_only": False}
        )
    _, frozen = build_configs(
        "default", {"backbone": "x", "num_experts": 3, "head_side": "query"}, {"freeze_backbone": True}
    )
    assert frozen.freeze_backbone and not frozen.head_only
    with pytest.raises(UsageError, match="needs a head"):
        ModelConfig(backbone="x", num_experts=0, head_side="query").validate()


def test_orthogonal_map_recovers_a_rotation():
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    queries = rng.normal(size=(200, 16)).astype(np.float32)
    found = orthogonal_map(queries, queries @ rotation)
    np.testing.assert_allclose(found, rotation, atol=1e-4)
    np.testing.assert_allclose(found @ found.T, np.eye(16), atol=1e-5)


def test_the_procrustes_control_rotates_queries_only_and_serves_from_the_backbone_index(
    tiny_bert_dir, scifact_slice, backbone_index, tmp_path
):
    backbone_dir, index_dir = backbone_index
    backbone = Retriever.load(str(backbone_dir), device="cpu")
    collection = load_collection(scifact_slice)
    _, train_config = build_configs("default", {"backbone": str(tiny_bert_dir)}, {})
    model = procrustes_model(backbone, collection, train_config, FP32)
    texts = [collection.queries[q] for q in list(collection.queries)[:5]]
    np.testing.assert_array_equal(
        encode_texts(model, texts, "document", FP32), encode_texts(backbone, texts, "document", FP32)
    )
    # Queries: the backbone's pooled embedding times W, then the model's own normalisation.
    weight = model.head_module.linear.weight.detach().numpy()
    rotation = weight.T + np.eye(len(weight), dtype=np.float32)
    np.testing.assert_allclose(rotation @ rotation.T, np.eye(len(rotation)), atol=1e-5)
    pooled = encode_pooled(backbone, texts, "query", FP32)
    rotated = pooled @ rotation
    expected = rotated / np.linalg.norm(rotated, axis=1, keepdims=True)
    np.testing.assert_allclose(encode_texts(model, texts, "query", FP32), expected, atol=1e-5)

    # As a grid control: scored like a model, saved as one, searched on the backbone's index.
    from sbmoe.config.jobs import EvaluateConfig
    from sbmoe.study.controls import ZeroShotModel, evaluate_control

    zero_shot = ZeroShotModel(backbone, FP32)
    output = evaluate_control(
        "procrustes", collection, tmp_path / "eval", EvaluateConfig(), train_config, zero_shot
    )
    assert 0 <= output.result.metrics["ndcg@10"] <= 1 and (tmp_path / "eval" / "run.trec").exists()
    saved = Retriever.load(str(tmp_path / "eval" / "model"), device="cpu")
    assert saved.config.head_side == "query"
    search_saved(saved, index_dir, {"q": texts[0]}, encode=FP32)  # accepted: documents are the backbone's


def test_query_side_cells_run_in_a_grid_and_the_study_grid_expands(
    tiny_bert_dir, data_dir, tmp_path, monkeypatch
):
    from conftest import REPO, write_beir_slice

    from sbmoe.core.io import read_json
    from sbmoe.study.experiments import run_experiment
    from sbmoe.study.grid import cell_configs, check_grid, expand, load_grid

    write_beir_slice(data_dir / "scifact", tmp_path / "data" / "scifact", 24, 8, 30)
    monkeypatch.setenv("SBMOE_DATA_DIR", str(tmp_path / "data"))
    grid = check_grid(
        {
            "name": "query-side",
            "backbones": [str(tiny_bert_dir)],
            "collections": ["scifact"],
            "seeds": [1],
            "experts": [2],
            "variants": {
                "procrustes": {"control": "procrustes"},
                "query-sb-moe": {"head_side": "query"},
                "query-linear": {"head_side": "query", "head": "linear"},
            },
            "model": {"max_doc_length": 32},
            "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32", "checkpoint_selection": "last"},
        }
    )
    summary = run_experiment(grid, tmp_path / "out", JobOptions(show_progress=False))
    assert len(summary.finished) == 3 and not summary.failed
    for cell in expand(grid):
        done = read_json(tmp_path / "out" / "cells" / cell.cell_id / "done.json")
        assert "scifact" in done["evaluations"]
        if cell.control is None:
            assert cell_configs(grid, cell)[1].head_only  # query-side heads train alone
            assert done["training"]["steps"] == 2
        if cell.variant == "query-sb-moe":  # documents skip the head: only queries are routed
            routing = read_json(
                tmp_path / "out" / "cells" / cell.cell_id / "eval" / "scifact" / "routing.json"
            )
            assert set(routing) == {"queries"}
            from sbmoe.study.plots import plot_expert_usage

            assert plot_expert_usage({"query side": routing}, tmp_path / "usage.png").stat().st_size > 0

    study = expand(load_grid(REPO / "experiments" / "query-side.yaml"))
    assert len(study) == 2 * (8 * 3 + 2)  # per collection: 8 trained variants x 3 seeds, 2 untrained


def test_a_query_side_head_saved_with_the_old_residual_gain_is_refused_in_one_line(tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from sbmoe.core.errors import ModelLoadError

    query_side(tiny_bert_dir, "moe").save(tmp_path / "model")
    (weights,) = [
        path for path in (tmp_path / "model").rglob("*.safetensors") if "expert_w1" in load_file(path)
    ]
    state = load_file(weights)
    save_file({**state, "residual_gain": torch.zeros(1)}, weights)
    with pytest.raises(ModelLoadError, match="train it again"):
        Retriever.load(str(tmp_path / "model"), device="cpu")
