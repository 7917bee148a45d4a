"""Model cards: what a saved model's README.md says, and that its usage lines load the model."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch
import yaml

from sbmoe.cli.main import main
from sbmoe.config.jobs import EncodeConfig, EvaluateConfig, JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.data.beir import load_collection
from sbmoe.evaluation.evaluate import evaluate_model
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.backbones import hub_model_id
from sbmoe.model.card import LOCAL_PLACEHOLDER
from sbmoe.model.retriever import Retriever

TEXTS = ["Vitamin D deficiency is linked to depression.", "Aspirin lowers the risk of stroke in adults."]


def read_card(directory) -> tuple[dict, str]:
    text = (directory / "README.md").read_text(encoding="utf-8")
    _, front, body = text.split("---\n", 2)
    return yaml.safe_load(front), body


def code_blocks(body: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", body, flags=re.DOTALL)


def run_usage_lines(body: str, directory) -> dict:
    """Run the card's Python lines with the model's folder in place of the placeholder."""
    (python,) = code_blocks(body, "python")
    namespace: dict = {}
    exec(python.replace(LOCAL_PLACEHOLDER, str(directory)), namespace)
    return namespace


def test_trained_model_card_names_base_model_data_settings_and_dev_metrics(tensorboard_run, tiny_bert_dir):
    output, result, _ = tensorboard_run
    metadata, body = read_card(output)
    assert metadata["library_name"] == "sentence-transformers"
    assert metadata["pipeline_tag"] == "sentence-similarity"
    assert {"sbmoe", "sentence-similarity", "mixture-of-experts", "dense-retrieval"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["BeIR/scifact"]
    assert metadata["metrics"] == ["ndcg@10"]
    assert "base_model" not in metadata  # a local backbone is no hub id
    assert "sentence_transformers_model_id" not in body  # not sentence-transformers' unfilled template

    start = json.loads((output / "training" / "log.jsonl").read_text().splitlines()[0])
    for row in (
        f"| Base model | `{tiny_bert_dir}` (local) |",
        "| Head | 3 experts, learned gating, top1 expert pooling |",
        "| Pooling | mean |",
        "| Similarity | cosine |",
        "| Token limits | queries 128, documents 48 |",
        f"| Data | scifact: split `train`, {start['training_pairs']} query-document pairs |",
        f"| Dev set | 10% of the train queries, held out: {start['dev_queries']} queries, over 30 documents "
        "(a sample) |",
        f"| Steps | 3 ({start['steps_per_epoch']} per epoch) |",
        "| Batch | 8 pairs, in-batch negatives |",
        "| Loss | in-batch contrastive, temperature 0.05; load balancing 0.01, router z-loss 0.001 |",
        "| Seed | 42 |",
        "| Model selection | last checkpoint on dev nDCG@10 |",
    ):
        assert row in body
    assert "learning rate backbone 2e-05, head 0.001" in body
    assert f"Kept: step 3, dev nDCG@10 {result.best_dev_ndcg10:.4f}" in body
    assert [row["step"] for row in result.dev_history] == [2, 3]
    assert all(f"| {row['step']} | {row['dev_ndcg@10']:.4f} |" in body for row in result.dev_history)
    assert "## Evaluation" not in body  # no test metrics until an evaluation is added


def test_card_usage_lines_load_the_model_in_sentence_transformers(tensorboard_run):
    output, _, _ = tensorboard_run
    _, body = read_card(output)
    (install,) = code_blocks(body, "bash")[:1]
    assert install.startswith("pip install sbmoe")
    assert 'Retriever.load("path/to/model").model' in body
    assert "trust_remote_code=True)" not in body  # sbmoe never needs remote code: the card must not ask
    model = run_usage_lines(body, output)["model"]
    expected = encode_texts(Retriever.load(str(output)), TEXTS, "document", EncodeConfig(precision="fp32"))
    np.testing.assert_allclose(model.encode(TEXTS), expected, rtol=1e-5, atol=1e-5)


def test_baseline_card_says_plain_sentence_transformers_and_that_loads_it(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    baseline = Retriever.from_config(
        ModelConfig(backbone=str(tiny_bert_dir), num_experts=0, similarity="dot")
    )
    baseline.save(tmp_path / "model")
    metadata, body = read_card(tmp_path / "model")
    assert "mixture-of-experts" not in metadata["tags"]
    assert "| Head | no head (the plain fine-tuned bi-encoder) |" in body
    assert "Not trained by sbmoe" in body
    assert code_blocks(body, "bash")[0].strip() == "pip install sentence-transformers"
    assert "trust_remote_code" not in body
    model = run_usage_lines(body, tmp_path / "model")["model"]  # sbmoe's module class is not needed
    assert model.similarity_fn_name == "dot"  # model.similarity scores as sbmoe does
    expected = encode_texts(baseline, TEXTS, "document", EncodeConfig(precision="fp32"))
    np.testing.assert_allclose(model.encode(TEXTS), expected, rtol=1e-5, atol=1e-5)


def test_linear_adapter_card_names_the_adapter_and_its_load_lines_work(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    adapter = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), head="linear"))
    with torch.no_grad():
        adapter.head_module.linear.weight.normal_(std=0.1)
    adapter.save(tmp_path / "model")
    metadata, body = read_card(tmp_path / "model")
    assert "mixture-of-experts" not in metadata["tags"]
    assert "| Head | a linear residual adapter, y = x + W x + b (no experts, no gate) |" in body
    assert "`sbmoe.model.adapters.LinearAdapter`" in body and "starts at zero" in body
    assert code_blocks(body, "bash")[0].startswith("pip install sbmoe")
    model = run_usage_lines(body, tmp_path / "model")["model"]
    expected = encode_texts(adapter, TEXTS, "document", EncodeConfig(precision="fp32"))
    np.testing.assert_allclose(model.encode(TEXTS), expected, rtol=1e-5, atol=1e-5)


def test_hub_ids_of_backbones():
    assert hub_model_id("all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert hub_model_id("BAAI/bge-small-en-v1.5") == "BAAI/bge-small-en-v1.5"
    assert hub_model_id("/models/tiny") is None
    assert hub_model_id("./org/name") is None


def test_model_card_command_adds_test_metrics_of_this_model_only(tensorboard_run, tmp_path, capsys):
    output, _, _ = tensorboard_run
    model = tmp_path / "model"
    shutil.copytree(output, model, ignore=shutil.ignore_patterns("training"))
    collection = load_collection(output.parent / "scifact", splits=["test"])
    (evaluation,) = evaluate_model(
        Retriever.load(str(model)),
        collection,
        tmp_path / "eval",
        EvaluateConfig(metrics=["ndcg@10", "recall@100"]),
        EncodeConfig(precision="fp32", backend="torch"),
        options=JobOptions(show_progress=False),
    )
    assert main(["model-card", str(model), "--evaluation", str(tmp_path / "eval")]) == 0
    metadata, body = read_card(model)
    assert metadata["metrics"] == ["ndcg@10", "recall@100"]
    ndcg, recall = evaluation.result.metrics["ndcg@10"], evaluation.result.metrics["recall@100"]
    queries = evaluation.result.num_queries
    assert f"| scifact | test | top1 | {queries} | {ndcg:.4f} | {recall:.4f} |" in body

    other = tmp_path / "other-eval"
    shutil.copytree(tmp_path / "eval", other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_fingerprint": "0" * 64}))
    capsys.readouterr()
    assert main(["model-card", str(model), "--evaluation", str(other)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "scored another model" in error and str(other) in error
    assert read_card(model)[1] == body  # the card is left as it was


@pytest.mark.parametrize("what", ["missing", "foreign"])
def test_model_card_command_refuses_what_is_not_a_saved_model(tmp_path, capsys, what):
    folder = tmp_path / "folder"
    if what == "foreign":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a model")
    assert main(["model-card", str(folder)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and str(folder) in error


def test_query_side_card_says_so_and_its_usage_lines_encode_each_side(tiny_bert_dir, tmp_path):
    torch.manual_seed(0)
    config = ModelConfig(backbone=str(tiny_bert_dir), num_experts=3, head_side="query")
    adapted = Retriever.from_config(config)
    with torch.no_grad():
        adapted.head.expert_w2.normal_(std=0.1)
    adapted.save(tmp_path / "model")
    _, body = read_card(tmp_path / "model")
    assert "on queries only (documents keep the backbone's embeddings)" in body
    assert "starts as the identity" in body and "nothing is re-encoded" in body
    namespace = run_usage_lines(body, tmp_path / "model")  # model.encode() would be refused
    fp32 = EncodeConfig(precision="fp32")
    query = encode_texts(adapted, ["What lowers the risk of stroke?"], "query", fp32)
    document = encode_texts(adapted, ["Aspirin lowers the risk of stroke in adults."], "document", fp32)
    np.testing.assert_allclose(namespace["queries"], query, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(namespace["documents"], document, rtol=1e-5, atol=1e-5)
