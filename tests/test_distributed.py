"""Data-parallel training and indexing under torchrun (2 gloo processes on the CPU) against one process."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_same_top_k, interrupt_at_step, search_saved
from distributed_worker import TRAIN_ARGS, VARIANTS, variant_configs

from sbmoe.cli.main import main
from sbmoe.config.jobs import EncodeConfig, JobOptions, SearchConfig
from sbmoe.config.presets import build_configs
from sbmoe.core.distributed import (
    DistributedContext,
    all_gather_with_grad,
    data_parallel,
    init_distributed,
    parse_shard,
    shard_bounds,
)
from sbmoe.core.io import read_json
from sbmoe.core.runtime import resolve_device, seed_everything
from sbmoe.data.beir import load_collection
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.indexing import build_index
from sbmoe.retrieval.search import search
from sbmoe.training.trainer import build_trainer, train

WORKER = Path(__file__).with_name("distributed_worker.py")


@pytest.fixture(scope="module")
def dropout_free_bert(tiny_bert_dir, tmp_path_factory) -> Path:
    """The tiny BERT without dropout: two runs compare exactly only if training draws no randomness."""
    directory = tmp_path_factory.mktemp("tiny-bert-no-dropout")
    shutil.copytree(tiny_bert_dir, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def torchrun_outputs(dropout_free_bert, scifact_slice, tmp_path_factory) -> Path:
    """One torchrun launch of two processes: training, interrupted-and-resumed training, indexing."""
    work = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(WORKER),
        str(work),
        str(dropout_free_bert),
        str(scifact_slice),
    ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return work


def train_log(directory: Path) -> list[dict]:
    lines = (directory / "training" / "log.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["event"] == "train"]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return Retriever.load(str(directory), device="cpu").model.state_dict()


def assert_close_weights(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=1e-4, atol=2e-6, msg=key)


def test_two_processes_train_like_one_with_the_doubled_batch(
    torchrun_outputs, dropout_free_bert, scifact_slice, tmp_path
):
    single = tmp_path / "single"
    arguments = ["--model", str(dropout_free_bert), "--data", str(scifact_slice), "--output", str(single)]
    assert main(["-q", "train", *arguments, "--batch-size", "8", *TRAIN_ARGS]) == 0
    ddp = torchrun_outputs / "ddp"

    one, two = train_log(single), train_log(ddp)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]  # only rank 0 logs
    for key in ("loss", "contrastive", "load_balancing", "router_z"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key

    before = Retriever.from_config(
        build_configs("default", {"backbone": str(dropout_free_bert), "num_experts": 3})[0], device="cpu"
    ).model.state_dict()
    trained = weights(ddp)
    changed = {key.split(".")[0] for key in before if not torch.equal(before[key], trained[key])}
    assert changed == {"0", "2"}  # the backbone and the head both learned
    assert_close_weights(weights(single), trained)

    # Dev nDCG@10 under two processes (each scores half of the corpus) equals the whole-corpus one.
    dev_one = read_json(single / "training" / "done.json")["dev_history"]
    dev_two = read_json(ddp / "training" / "done.json")["dev_history"]
    assert [r["dev_ndcg@10"] for r in dev_two] == pytest.approx([r["dev_ndcg@10"] for r in dev_one], abs=1e-6)
    config = read_json(ddp / "training" / "config.json")
    assert config["world_size"] == 2 and config["train_config"]["batch_size"] == 4


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_two_processes_train_like_one_under_gradient_caching_and_head_only(
    torchrun_outputs, dropout_free_bert, scifact_slice, tmp_path, variant
):
    model_config, train_config = variant_configs(str(dropout_free_bert), variant, batch_size=8)
    train(
        model_config,
        train_config,
        load_collection(scifact_slice),
        tmp_path,
        JobOptions(show_progress=False),
        init_distributed("cpu"),
    )
    one, two = train_log(tmp_path), train_log(torchrun_outputs / variant)
    assert [r["step"] for r in two] == [r["step"] for r in one] == [1, 2, 3]
    for key in ("loss", "contrastive"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5), key
    assert_close_weights(weights(tmp_path), weights(torchrun_outputs / variant))


def test_training_resumed_under_two_processes_ends_like_an_uninterrupted_run(torchrun_outputs):
    resumed = torchrun_outputs / "resumed"
    log = train_log(resumed)
    assert [r["step"] for r in log] == [1, 2, 3]  # steps 1-2 before the interruption, 3 after
    assert read_json(resumed / "training" / "done.json")["resumed_from_step"] == 2
    assert_close_weights(weights(torchrun_outputs / "ddp"), weights(resumed))
    assert len(read_json(resumed / "training" / "checkpoint" / "state.json")["rng"]) == 2  # one per process


def test_index_under_torchrun_writes_one_shard_per_process(torchrun_outputs, scifact_slice):
    index_dir = torchrun_outputs / "index-ddp"
    assert sorted(p.name for p in index_dir.iterdir()) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    collection = load_collection(scifact_slice)
    retriever = Retriever.load(str(torchrun_outputs / "ddp"), device="cpu")
    documents = {d: doc.full_text for d, doc in collection.corpus.items()}
    fp32 = EncodeConfig(precision="fp32")
    single = build_index(retriever, documents, encode=fp32)
    queries = dict(collection.queries)
    expected = search(retriever, single, queries, SearchConfig(top_k=10), fp32)
    sharded = search_saved(retriever, index_dir, queries, SearchConfig(top_k=10), fp32)
    assert_same_top_k(expected, sharded)


def test_refuses_to_resume_on_another_number_of_processes(tiny_bert_dir, scifact_slice, tmp_path):
    model_config, train_config = build_configs(
        "default",
        {"backbone": str(tiny_bert_dir), "num_experts": 3, "max_doc_length": 48},
        {"max_steps": 3, "batch_size": 8, "precision": "fp32", "checkpoint_steps": 1},
    )
    collection = load_collection(scifact_slice)
    seed_everything(0)
    trainer = build_trainer(
        Retriever.from_config(model_config),
        collection,
        train_config,
        tmp_path,
        JobOptions(show_progress=False),
    )
    interrupt_at_step(trainer, 1)
    with pytest.raises(KeyboardInterrupt):
        trainer.train()
    saved = read_json(tmp_path / "training" / "config.json")
    assert saved["world_size"] == 1
    (tmp_path / "training" / "config.json").write_text(json.dumps({**saved, "world_size": 2}))
    with pytest.raises(ValueError, match="same number of processes"):
        build_trainer(
            Retriever.from_config(model_config),
            collection,
            train_config,
            tmp_path,
            JobOptions(show_progress=False),
        ).train()


# ------------------------------------------------------------------------------ single-process parts
def test_single_process_context_and_devices(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    context = init_distributed("cpu")
    assert (context.rank, context.world_size, context.is_main, context.is_distributed) == (0, 1, True, False)
    assert context.broadcast_object({"a": 1}) == {"a": 1}
    assert context.all_gather_object(3) == [3]
    assert context.run_on_main(lambda: 5) == 5
    with pytest.raises(KeyError):
        context.run_on_main(lambda: {}["missing"])
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(ValueError, match="no CUDA device"):
            resolve_device("cuda")


def test_gather_and_data_parallel_are_identities_in_one_process():
    context = DistributedContext()
    x = torch.randn(3, 4, requires_grad=True)
    gathered = all_gather_with_grad(x, [3], context)
    gathered.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 4))
    with pytest.raises(ValueError, match="holds 3 rows"):
        all_gather_with_grad(x, [2], context)
    module = torch.nn.Linear(2, 2)
    assert data_parallel(module, context) is module  # no DDP: gradients stay as backward left them


def test_shards_are_consecutive_and_balanced():
    assert [shard_bounds(10, i, 3) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
    assert [shard_bounds(2, i, 3) for i in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert parse_shard("2/5") == (2, 5)
    for bad in ("5/5", "-1/3", "a/b", "3", "1/0"):
        with pytest.raises(ValueError):
            parse_shard(bad)
    with pytest.raises(ValueError):
        shard_bounds(10, 3, 3)
