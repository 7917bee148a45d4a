"""Each control is what it says (linear adapter, random gate, one expert, document priors), and grids
evaluate transfer by default with per-collection settings."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import REPO, assert_same_top_k, write_beir_slice
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig, EvaluateConfig, JobOptions, SearchConfig
from sbmoe.config.model import ModelConfig
from sbmoe.config.presets import build_configs
from sbmoe.config.train import TrainConfig
from sbmoe.core.choices import PRIOR_CONTROLS
from sbmoe.core.io import read_json
from sbmoe.data.beir import load_collection, train_dev_split
from sbmoe.evaluation.evaluate import evaluate_model
from sbmoe.evaluation.metrics import read_trec_run
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.adapters import LinearAdapter
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.search import search_documents
from sbmoe.study import controls as priors
from sbmoe.study.controls import (
    BETA_GRID,
    PriorScorer,
    ZeroShotModel,
    document_counts,
    document_prior_run,
    evaluate_control,
)
from sbmoe.study.experiments import run_experiment
from sbmoe.study.grid import cell_configs, check_grid, expand, load_grid
from sbmoe.study.results import collect_results
from sbmoe.training.trainer import build_trainer

TEXTS = ["Vitamin D deficiency is linked to depression.", "a b c", "Aspirin lowers the risk of stroke."]
FP32 = EncodeConfig(precision="fp32")

QUIET = JobOptions(show_progress=False)


def tiny(tiny_bert_dir, **overrides) -> Retriever:
    torch.manual_seed(0)
    return Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), **overrides))


def tiny_configs(tiny_bert_dir, model: dict, **train) -> tuple[ModelConfig, TrainConfig]:
    values = {"max_steps": 3, "batch_size": 8, "precision": "fp32", "checkpoint_steps": None}
    values.update(checkpoint_selection="last", lr_head=1e-2, **train)
    return build_configs("default", {"backbone": str(tiny_bert_dir), "max_doc_length": 48, **model}, values)


def test_linear_adapter_is_one_zero_initialised_residual_linear(tiny_bert_dir):
    retriever = tiny(tiny_bert_dir, head="linear", num_experts=6)
    adapter = retriever.head_module
    assert [type(m).__name__ for m in retriever.model.children()] == [
        "Transformer",
        "Pooling",
        "LinearAdapter",
        "Normalize",
    ]
    assert isinstance(adapter, LinearAdapter) and retriever.head is None  # no experts, no gate
    assert retriever.config.num_experts == 0  # the experts setting does not apply
    d = 32
    assert sum(p.numel() for p in adapter.parameters()) == d * d + d
    assert retriever.parameter_groups()[1] == list(adapter.parameters())  # trained at the head's rate
    assert set(adapter({"sentence_embedding": torch.randn(4, d)})) == {"sentence_embedding"}  # no router
    # Zero initialisation: untrained, it is the zero-shot model.
    zero_shot = tiny(tiny_bert_dir, num_experts=0)
    expected = encode_texts(zero_shot, TEXTS, "query", FP32)
    np.testing.assert_allclose(encode_texts(retriever, TEXTS, "query", FP32), expected, atol=1e-6)


def test_linear_adapter_round_trips_through_sbmoe_and_sentence_transformers(tiny_bert_dir, tmp_path):
    retriever = tiny(tiny_bert_dir, head="linear")
    with torch.no_grad():
        retriever.head_module.linear.weight.normal_(std=0.2)
        retriever.head_module.linear.bias.normal_(std=0.2)
    retriever.save(tmp_path / "model")
    expected = encode_texts(retriever, TEXTS, "document", FP32)
    reloaded = SentenceTransformer(str(tmp_path / "model"), trust_remote_code=True, device="cpu")
    assert isinstance(reloaded[2], LinearAdapter)
    np.testing.assert_allclose(reloaded.encode(TEXTS, convert_to_numpy=True), expected, rtol=1e-5, atol=1e-5)
    loaded = Retriever.load(str(tmp_path / "model"))
    assert loaded.config == retriever.config and loaded.fingerprint() == retriever.fingerprint()

    # The head stage is the one record of the head: sbmoe.json saying otherwise changes nothing.
    saved = json.loads((tmp_path / "model" / "sbmoe.json").read_text())
    saved["model_config"]["head"] = "moe"
    (tmp_path / "model" / "sbmoe.json").write_text(json.dumps(saved))
    edited = Retriever.load(str(tmp_path / "model"))
    assert edited.config.head == "linear" and isinstance(edited.head_module, LinearAdapter)
    assert edited.fingerprint() == retriever.fingerprint()


def train_head_only(retriever, collection_dir, train_config, tmp_path) -> None:
    """Train ``retriever`` on the collection in ``tmp_path/run``, pooled texts cached in ``tmp_path``."""
    build_trainer(
        retriever,
        load_collection(collection_dir),
        train_config,
        tmp_path / "run",
        JobOptions(show_progress=False, cache=EmbeddingCache(tmp_path / "cache")),
    ).train()


def test_linear_adapter_trains_head_only_on_cached_embeddings(tiny_bert_dir, scifact_slice, tmp_path):
    model_config, train_config = tiny_configs(tiny_bert_dir, {"head": "linear"}, head_only=True)
    retriever = Retriever.from_config(model_config)
    backbone = {k: v.clone() for k, v in retriever.model[0].state_dict().items()}
    train_head_only(retriever, scifact_slice, train_config, tmp_path)
    assert torch.count_nonzero(retriever.head_module.linear.weight) > 0  # it learned
    for key, value in retriever.model[0].state_dict().items():
        assert torch.equal(value, backbone[key]), key  # the backbone is frozen
    loaded = Retriever.load(str(tmp_path / "run"))
    assert torch.equal(loaded.head_module.linear.weight, retriever.head_module.linear.weight)
    log = (tmp_path / "run" / "training" / "log.jsonl").read_text().splitlines()
    assert not any(json.loads(line)["event"] == "routing" for line in log)  # nothing to route


def test_random_gate_stays_fixed_while_experts_learn_head_only(tiny_bert_dir, scifact_slice, tmp_path):
    model_config, train_config = tiny_configs(
        tiny_bert_dir, {"gating": "random", "num_experts": 3, "expert_pooling": "all"}, head_only=True
    )
    retriever = Retriever.from_config(model_config)
    head = retriever.head
    fixed = {k: v.clone() for k, v in head.state_dict().items() if k.startswith(("gate.", "noise."))}
    experts = head.expert_w1.detach().clone()
    train_head_only(retriever, scifact_slice, train_config, tmp_path)
    assert fixed and all(torch.equal(head.state_dict()[k], v) for k, v in fixed.items())
    assert not torch.equal(experts, head.expert_w1)


def test_one_expert_control_has_one_expert():
    grid = check_grid(
        {"backbones": ["b"], "collections": ["c"], "experts": [3, 6], "variants": {"one": {"num_experts": 1}}}
    )
    (cell,) = expand(grid)
    assert cell.experts == 1 and cell_configs(grid, cell)[0].num_experts == 1


def test_one_expert_model_routes_everything_to_its_expert(tiny_bert_dir):
    head = tiny(tiny_bert_dir, num_experts=1).head
    assert head.num_experts == 1 and head.expert_w1.shape[0] == 1 and head.gate[-1].out_features == 1
    assert head({"sentence_embedding": torch.randn(5, 32)})["expert_index"].tolist() == [0] * 5


def test_document_prior_counts_training_queries_and_breaks_ties_by_doc_id():
    counts = document_counts({"q1": {"b": 1, "a": 0}, "q2": {"b": 2, "c": 1}, "q3": {"c": 1}})
    assert counts == {"b": 2, "c": 2}  # a grade of 0 is no positive
    run = document_prior_run(counts, ["d", "c", "b", "a"], ["q9", "b"], k=3, exclude_self=True)
    assert list(run["q9"]) == ["b", "c", "a"] and run["q9"]["b"] == 2.0
    assert list(run["b"]) == ["c", "a", "d"]  # exclude_self drops the query's own id


class Unreadable(dict):
    """Query texts that fail the test when read (membership tests still work)."""

    def __getitem__(self, key):
        raise AssertionError(f"the text of query {key!r} was read")

    def values(self):
        raise AssertionError("query texts were read")

    items = values


def test_document_prior_never_reads_the_query_text(scifact_slice, tmp_path):
    collection = load_collection(scifact_slice)
    garbage = dataclasses.replace(collection, queries={q: "zq xv garbage" for q in collection.queries})
    unreadable = dataclasses.replace(collection, queries=Unreadable(collection.queries))
    outputs = [
        evaluate_control("document-prior", c, tmp_path / str(i), EvaluateConfig(), TrainConfig())
        for i, c in enumerate((collection, garbage, unreadable))
    ]
    runs = [read_trec_run(tmp_path / str(i) / "run.trec") for i in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert outputs[0].result.per_query == outputs[2].result.per_query
    counts = document_counts(collection.qrels["train"])
    first = next(iter(runs[0].values()))
    assert max(first.values()) == max(counts.values())  # scores are the counts
    assert len(first) == min(100, len(collection.corpus))  # the top 100
    assert read_json(tmp_path / "0" / "config.json")["control"] == "document-prior"
    assert set(read_json(tmp_path / "0" / "metrics.json")) >= {"ndcg@10", "num_queries"}


def test_zero_shot_plus_prior_adds_the_weighted_prior_and_beta_zero_is_zero_shot(
    tiny_bert_dir, scifact_slice, tmp_path, monkeypatch
):
    retriever = tiny(tiny_bert_dir, num_experts=0, max_doc_length=48)
    collection = load_collection(scifact_slice)
    query_ids = sorted(collection.qrels["test"])
    doc_ids = list(collection.corpus)
    queries = {q: collection.queries[q] for q in query_ids}
    documents = {d: collection.corpus[d].full_text for d in doc_ids}
    (zero_shot,) = search_documents(retriever, queries, documents, SearchConfig(top_k=20), FP32).values()
    counts = document_counts(collection.qrels["train"])
    scorer = PriorScorer(encode_texts(retriever, list(documents.values()), "document", FP32), doc_ids, counts)
    query_embeddings = encode_texts(retriever, list(queries.values()), "query", FP32)
    assert_same_top_k(zero_shot, scorer.run(query_embeddings, query_ids, 0.0, 20))
    boosted = scorer.run(query_embeddings, query_ids, 0.5, 20)
    for query_id in query_ids:
        for doc_id in set(boosted[query_id]) & set(zero_shot[query_id]):
            expected = zero_shot[query_id][doc_id] + 0.5 * math.log1p(counts.get(doc_id, 0))
            assert boosted[query_id][doc_id] == pytest.approx(expected, abs=1e-5)

    # End to end: beta is chosen on the trainer's dev carve; with only beta = 0 on offer, the control
    # is the zero-shot model.
    train_config, zero_shot = TrainConfig(seed=3), ZeroShotModel(retriever, FP32)
    output = evaluate_control(
        "zero-shot+prior", collection, tmp_path / "prior", EvaluateConfig(), train_config, zero_shot
    )
    scores = output.details["dev_ndcg@10"]
    assert set(scores) == {str(b) for b in BETA_GRID} and output.details["beta"] in BETA_GRID
    assert scores[str(output.details["beta"])] == max(scores.values())
    assert read_json(tmp_path / "prior" / "config.json")["details"]["beta"] == output.details["beta"]
    assert output.details["dev_queries"] == len(train_dev_split(collection, seed=3)[1])  # the trainer's
    monkeypatch.setattr(priors, "BETA_GRID", (0.0,))
    evaluate_control(
        "zero-shot+prior", collection, tmp_path / "beta0", EvaluateConfig(), train_config, zero_shot
    )
    evaluate_model(
        retriever,
        collection,
        tmp_path / "zero-shot",
        EvaluateConfig(),
        FP32,
        options=JobOptions(show_progress=False),
    )
    assert_same_top_k(
        read_trec_run(tmp_path / "zero-shot" / "run.trec"), read_trec_run(tmp_path / "beta0" / "run.trec")
    )


@pytest.fixture(scope="module")
def two_collections(data_dir, tmp_path_factory):
    """Small real slices of SciFact and NFCorpus, under their own names in one data folder."""
    root = tmp_path_factory.mktemp("two-collections")
    write_beir_slice(data_dir / "scifact", root / "scifact", 24, 8, 30)
    write_beir_slice(data_dir / "nfcorpus", root / "nfcorpus", 4, 6, 20)
    return root


def test_grid_evaluates_transfer_by_default_controls_included(
    tiny_bert_dir, two_collections, tmp_path, monkeypatch
):
    monkeypatch.setenv("SBMOE_DATA_DIR", str(two_collections))
    values = {
        "name": "controls",
        "backbones": [str(tiny_bert_dir)],
        "collections": ["scifact", "nfcorpus"],
        "seeds": [1],
        "experts": [2, 3],
        "variants": {
            "zero-shot": {"num_experts": 0, "train": False},
            "document-prior": {"control": "document-prior"},
            "zero-shot+prior": {"control": "zero-shot+prior"},
            "linear": {"head": "linear", "train": {"head_only": True}},
            "procrustes": {"control": "procrustes"},
        },
        "model": {"max_doc_length": 32},
        "train": {"max_steps": 2, "batch_size": 8, "precision": "fp32", "checkpoint_selection": "last"},
        "evaluate_per_collection": {"nfcorpus": {"exclude_self": True}},
        "transfer": False,
    }
    output = tmp_path / "out"
    grid = check_grid(values)
    cells = expand(grid)
    # The linear adapter and the controls have no experts: not expanded over the experts axis.
    assert len(cells) == 2 * 5 and {c.experts for c in cells} == {0}
    first = run_experiment(grid, output, QUIET)
    assert len(first.finished) == 10 and not first.failed
    trained = read_json(output / "cells" / cells[3].cell_id / "done.json")["training"]
    assert cells[3].variant == "linear" and trained["steps"] == 2

    # Transfer on (the default): finished cells are evaluated on the other collection, not retrained;
    # NFCorpus has its own evaluate settings.
    grid = check_grid({**values, "transfer": True})
    second = run_experiment(grid, output, QUIET)
    assert len(second.finished) == 6 and not second.failed  # the models and procrustes; priors stay
    for cell in expand(grid):
        done = read_json(output / "cells" / cell.cell_id / "done.json")
        other = "scifact" if cell.collection == "nfcorpus" else "nfcorpus"
        # A prior belongs to its collection: it is not carried to the other one. A Procrustes map
        # is: fitted on its training collection's pairs, it is evaluated elsewhere as a model.
        expected = [cell.collection] if cell.control in PRIOR_CONTROLS else [cell.collection, other]
        assert list(done["evaluations"]) == cell.evaluate_on == expected
        assert done["cell"]["control"] == cell.control
        folder = output / "cells" / cell.cell_id / "eval"
        for name in expected:
            exclude_self = read_json(folder / name / "config.json")["evaluate_config"]["exclude_self"]
            assert exclude_self is (name == "nfcorpus")
        if cell.control == "zero-shot+prior":
            assert done["controls"][cell.collection]["beta"] in BETA_GRID  # chosen on its own dev
            assert done["controls"][cell.collection]["prior_split"] == "train"
        if cell.control == "procrustes":
            fitted = Retriever.load(str(folder / cell.collection / "model"), device="cpu")
            transferred = read_json(folder / other / "config.json")
            assert transferred["model_fingerprint"] == fitted.fingerprint()
            assert transferred["model_config"]["head_side"] == "query"
        if cell.variant == "linear":
            saved = read_json(output / "cells" / cell.cell_id / "cell.json")
            assert saved["model_config"]["head"] == "linear"
            assert not (folder / "scifact" / "routing.json").exists()
    assert read_json(output / "cells" / cells[3].cell_id / "done.json")["training"] == trained
    assert run_experiment(grid, output, QUIET).skipped  # all finished now
    systems = collect_results(output)
    assert len(systems) == 2 * 2 * 3 + 2 * 2  # (trained on, evaluated on) x 3 models, priors in-domain

    # A collection evaluated under other settings is not reused.
    grid = check_grid({**values, "transfer": True, "evaluate_per_collection": {}})
    changed = r"evaluate_per_collection.nfcorpus \{'exclude_self': True\} -> \{\}"
    with pytest.raises(ValueError, match=changed):
        run_experiment(grid, output, QUIET)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"variants": {"v": {"control": "oracle"}}}, "unknown control"),
        ({"variants": {"v": {"control": "document-prior", "train": {"epochs": 2}}}}, "never trained"),
        ({"evaluate_per_collection": {"arguana": {"exclude_self": True}}}, "arguana"),
        ({"evaluate_per_collection": {"c": {"exclude": True}}}, "unknown settings"),
        ({"train_per_collection": {"c": {"epoch": 3}}}, "unknown settings"),
        ({"transfer": "yes"}, "`transfer`"),
    ],
)
def test_bad_control_and_per_collection_settings_are_refused(extra, message):
    with pytest.raises(ValueError, match=message):
        check_grid({"backbones": ["b"], "collections": ["c"], "variants": {"v": {}}, **extra})


def test_exclude_self_per_collection_and_transfer_targets():
    grid = check_grid(
        {
            "backbones": ["b"],
            "collections": ["c"],
            "variants": {"v": {}},
            "transfer": {"c": ["arguana"]},
            "evaluate": {"top_k": 10},
            "evaluate_per_collection": {"arguana": {"exclude_self": True}},
        }
    )
    assert expand(grid)[0].evaluate_on == ["c", "arguana"]
    assert grid.evaluate_settings("arguana") == {"top_k": 10, "exclude_self": True}
    assert grid.evaluate_settings("c") == {"top_k": 10}


def test_what_helps_grid_expands_to_the_study():
    grid = load_grid(REPO / "experiments" / "what-helps.yaml")
    cells = expand(grid)
    # per collection: 7 head-only + 6 fully fine-tuned variants x 3 seeds, 3 untrained systems once
    assert len(cells) == 2 * ((7 + 6) * 3 + 3) == 84
    for cell in cells:
        others = [] if cell.control else sorted({"scifact", "nfcorpus"} - {cell.collection})
        assert cell.evaluate_on == [cell.collection, *others]
    by_name = {(c.collection, c.variant, c.seed): c for c in cells}
    head_only = cell_configs(grid, by_name["nfcorpus", "head-only-linear", 1])
    assert head_only[0].head == "linear" and head_only[0].num_experts == 0
    assert (head_only[1].head_only, head_only[1].epochs, head_only[1].max_steps) == (True, 10, 300)
    assert cell_configs(grid, by_name["scifact", "head-only-linear", 1])[1].max_steps is None
    full = cell_configs(grid, by_name["nfcorpus", "sb-moe-all", 2])[1]
    assert (full.head_only, full.max_steps, full.batch_size) == (False, 300, 64)
    assert cell_configs(grid, by_name["scifact", "sb-moe-all", 2])[1].epochs == 3
    assert by_name["scifact", "zero-shot+prior", 1].control == "zero-shot+prior"
