"""`sbmoe serve` over real HTTP on loopback: a tiny MoE model and its index of a real SciFact slice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import assert_same_top_k

from sbmoe import __version__
from sbmoe.cli.main import main
from sbmoe.config.jobs import EncodeConfig, ServeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.errors import SbmoeError, UsageError
from sbmoe.data.beir import load_collection
from sbmoe.evaluation.metrics import read_trec_run
from sbmoe.inference.encoding import encode_texts
from sbmoe.inference.routing import route
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.indexing import build_index
from sbmoe.retrieval.search import search
from sbmoe.serve.http import BackgroundServer, create_app
from sbmoe.serve.service import SearchService, ServiceClosedError, load_service

pytest.importorskip("fastapi")
FP32 = EncodeConfig(precision="fp32", backend="torch", device="cpu")
ENCODE_FLAGS = ["--precision", "fp32", "--backend", "torch", "--device", "cpu"]
LIMITS = ServeConfig(max_top_k=50, max_texts=8)


def request(url: str, payload: dict | None = None) -> tuple[int, dict]:
    """POST ``payload`` as JSON (GET without one); the status and the decoded JSON answer."""
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json"}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.fixture(scope="module")
def model_dir(tiny_bert_dir, tmp_path_factory):
    torch.manual_seed(0)
    retriever = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=3), device="cpu")
    directory = tmp_path_factory.mktemp("serve") / "model"
    retriever.save(directory)
    return directory


@pytest.fixture(scope="module")
def index_dir(model_dir, scifact_slice, tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "index"
    command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice), "--output"]
    assert main([*command, str(directory), *ENCODE_FLAGS]) == 0
    return directory


@pytest.fixture(scope="module")
def server(model_dir, index_dir, scifact_slice):
    service = load_service(model_dir, index_dir, encode=FP32, data=scifact_slice)
    with BackgroundServer(create_app(service, LIMITS)) as running:
        yield running, service
    assert not service.alive  # the app's shutdown closed the service
    with pytest.raises(ServiceClosedError, match="closed"):
        service.search(["after the end"])


def test_concurrent_requests_rank_as_sbmoe_search(server, model_dir, index_dir, scifact_slice, tmp_path):
    running, service = server
    queries = load_collection(scifact_slice).queries
    run_file = tmp_path / "run.trec"
    searching = ["-q", "search", "--model", str(model_dir), "--index", str(index_dir), "--top-k", "10"]
    command = [*searching, "--queries", str(scifact_slice / "queries.jsonl"), "--output", str(run_file)]
    assert main([*command, *ENCODE_FLAGS]) == 0
    expected = read_trec_run(run_file)

    # Single queries and batches of 1 to 4, sent from 8 threads at once.
    ids = list(queries)
    groups, start = [], 0
    while start < len(ids):
        size = start % 4 + 1
        groups.append(ids[start : start + size])
        start += size

    def ask(group: list[str]) -> tuple[list[str], dict]:
        texts = [queries[q] for q in group]
        payload = {"query": texts[0]} if len(group) == 1 else {"queries": texts}
        status, body = request(f"{running.url}/search", {**payload, "top_k": 10})
        assert status == 200, body
        return group, body

    served = {}
    with ThreadPoolExecutor(8) as pool:
        for group, body in pool.map(ask, groups):
            assert [result["query"] for result in body["results"]] == [queries[q] for q in group]
            for query_id, result in zip(group, body["results"], strict=True):
                served[query_id] = {hit["id"]: hit["score"] for hit in result["hits"]}
                assert "routing" not in result and "title" not in result["hits"][0]
    assert_same_top_k({q: expected[q] for q in ids}, {q: served[q] for q in ids})
    assert service.stats["requests"] >= len(groups) and service.stats["texts"] >= len(ids)


def test_documents_and_routing_on_request(server, scifact_slice):
    running, service = server
    corpus = load_collection(scifact_slice, splits=[]).corpus
    text = "vitamin D deficiency and bone fractures"
    status, body = request(
        f"{running.url}/search", {"query": text, "top_k": 3, "documents": True, "routing": True}
    )
    assert status == 200, body
    (result,) = body["results"]
    assert len(result["hits"]) == 3
    for hit in result["hits"]:
        assert (hit["title"], hit["text"]) == (corpus[hit["id"]].title, corpus[hit["id"]].text)
    pooled = encode_texts(service.retriever, [text], "query", FP32, pooled_only=True)
    experts, gates = route(service.retriever, pooled)
    assert result["routing"]["expert"] == int(experts[0]) == int(np.argmax(result["routing"]["gate"]))
    np.testing.assert_allclose(result["routing"]["gate"], gates[0].numpy(), atol=1e-6)
    assert sum(result["routing"]["gate"]) == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["query", "document"])
def test_embeddings_are_the_librarys(server, kind):
    running, service = server
    texts = ["aspirin and the heart", "zinc deficiency " * 40]
    status, body = request(f"{running.url}/embed", {"texts": texts, "kind": kind})
    assert status == 200, body
    assert body["dim"] == service.dim and body["kind"] == kind
    expected = encode_texts(service.retriever, texts, kind, FP32)
    np.testing.assert_allclose(np.array(body["embeddings"]), expected, atol=1e-5)


@pytest.mark.parametrize(
    ("path", "payload", "message"),
    [
        ("search", {"query": ""}, "the text is empty"),
        ("search", {"query": "   "}, "the text is empty"),
        ("search", {"queries": ["fine", " "]}, "the text is empty"),
        ("search", {"queries": []}, "at least 1"),
        ("search", {"queries": ["q"] * 9}, "at most 8"),
        ("search", {"query": "q", "top_k": 0}, "greater than or equal to 1"),
        ("search", {"query": "q", "top_k": 51}, "less than or equal to 50"),
        ("search", {"query": "q", "top_k": "ten"}, "valid integer"),
        ("search", {"query": "q", "top_k": True}, "valid integer"),
        ("search", {"query": "q", "queries": ["q"]}, "either query"),
        ("search", {}, "either query"),
        ("search", {"query": "q", "topk": 5}, "Extra inputs"),
        ("embed", {"texts": ["q"], "kind": "passage"}, "'query' or 'document'"),
        ("embed", {"texts": ["q"] * 9}, "at most 8"),
        ("embed", {"texts": "not a list"}, "valid list"),
    ],
)
def test_bad_requests_get_422_with_the_reason(server, path, payload, message):
    running, _ = server
    status, body = request(f"{running.url}/{path}", payload)
    assert status == 422
    assert message in json.dumps(body["detail"])


def test_health_and_info(server, model_dir, scifact_slice):
    running, _ = server
    assert request(f"{running.url}/health") == (200, {"status": "ok"})
    status, info = request(f"{running.url}/info")
    assert status == 200
    assert info["sbmoe_version"] == __version__
    assert info["model"]["fingerprint"] == Retriever.load(str(model_dir), device="cpu").fingerprint()
    assert info["model"]["experts"] == 3
    corpus_size = sum(1 for _ in (scifact_slice / "corpus.jsonl").open())
    assert info["index"]["size"] == corpus_size and info["index"]["type"] == "flat"
    assert info["index"]["collection"] == "scifact-slice" == info["documents"]
    encoding = info["encoding"]
    assert (encoding["backend"], encoding["precision"], info["device"]) == ("torch", "fp32", "cpu")
    assert info["limits"] == {"max_top_k": 50, "max_texts": 8}


def test_without_the_collection_or_a_head_the_extras_are_refused(server, tiny_bert_dir, index_dir):
    _, service = server
    bare = SearchService(service.retriever, index_dir, encode=FP32)
    with BackgroundServer(create_app(bare)) as running:
        status, body = request(f"{running.url}/search", {"query": "q", "documents": True})
        assert status == 400 and "--data" in body["detail"]
        status, body = request(f"{running.url}/search", {"query": "q", "top_k": 2})
        assert status == 200 and len(body["results"][0]["hits"]) == 2
    with pytest.raises(UsageError, match="documents are not in the collection nfcorpus"):
        SearchService(service.retriever, index_dir, documents={"MED-10": None}, collection="nfcorpus")
    plain = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    index = build_index(plain, {"d1": "one text", "d2": "another"}, encode=FP32)
    with SearchService(plain, index, encode=FP32) as headless, pytest.raises(UsageError, match="no MoE head"):
        headless.search(["q"], routing=True)


def test_waiting_requests_are_encoded_together_except_under_int8(server, index_dir, scifact_slice):
    _, service = server
    texts = list(load_collection(scifact_slice).queries.values())[:24]
    expected = search(service.retriever, index_dir, {str(n): t for n, t in enumerate(texts)}, encode=FP32)
    before = dict(service.stats)
    # Submitted faster than one encoding takes: the worker finds them waiting and batches them.
    futures = [service.search([text]) for text in texts]
    served = {str(n): dict(future.result()[0].hits) for n, future in enumerate(futures)}
    assert service.stats["requests"] - before["requests"] == len(texts)
    assert service.stats["batches"] - before["batches"] < len(texts)
    assert_same_top_k(expected, served)

    int8 = EncodeConfig(backend="onnx", precision="int8", device="cpu")
    pairs = [texts[n : n + 2] for n in range(0, 12, 2)]
    with SearchService(service.retriever, index_dir, encode=int8) as quantised:
        assert not quantised.batches_requests
        futures = [quantised.search(pair) for pair in pairs]
        for pair, future in zip(pairs, futures, strict=True):
            # As `sbmoe search` with these two queries: int8 embeddings depend on their batch.
            alone = search(service.retriever, index_dir, {"a": pair[0], "b": pair[1]}, encode=int8)
            assert [result.hits for result in future.result()] == [list(alone[q].items()) for q in "ab"]
        assert quantised.stats["batches"] == len(pairs)


def test_serve_refuses_an_index_built_by_another_model(tiny_bert_dir, index_dir, capsys):
    command = ["-q", "serve", "--model", str(tiny_bert_dir), "--index", str(index_dir), "--port", "0"]
    assert main([*command, *ENCODE_FLAGS]) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "different model" in error


def test_without_the_serve_extra_the_command_says_what_to_install(index_dir, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "uvicorn" else find_spec(name)
    )
    assert main(["-q", "serve", "--model", "any", "--index", str(index_dir)]) == 2
    assert "needs uvicorn: pip install 'sbmoe[serve]'" in capsys.readouterr().err


def test_the_command_serves_until_interrupted(model_dir, index_dir):
    environment = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # -q silences logging, not the address: with --port 0 it is the only way to reach the service.
    command = [sys.executable, "-m", "sbmoe.cli", "-q", "serve", "--model", str(model_dir), "--index"]
    process = subprocess.Popen(
        [*command, str(index_dir), "--port", "0", *ENCODE_FLAGS],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )
    try:
        url = None
        for line in process.stdout:
            if line.startswith("listening on "):
                url = line.split()[-1]
                break
        assert url, "the server did not say where it listens"
        status, body = request(f"{url}/search", {"query": "vitamin D", "top_k": 2})
        assert status == 200 and len(body["results"][0]["hits"]) == 2
    finally:
        process.send_signal(signal.SIGINT)
        remaining = process.communicate(timeout=60)[1]
    assert process.returncode == 0, remaining


def test_a_sharded_index_is_verified_once_at_start(model_dir, scifact_slice, tmp_path):
    """--verify checks every shard before serving (a damaged one is refused), not on every request."""
    sharded = tmp_path / "sharded"
    command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice), "--output"]
    for shard in ("0/2", "1/2"):
        assert main([*command, str(sharded), "--shard", shard, *ENCODE_FLAGS]) == 0
    with load_service(model_dir, sharded, encode=FP32, verify=True) as service:
        assert not service.index.verify  # checked: searches open shards with the sample check only
        assert service.search(["vitamin D"]).result(timeout=60)[0]
    damaged = next(sharded.glob("shard-00001*")) / "index.faiss"
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    with pytest.raises(SbmoeError, match=r"corrupt|checksum"):
        load_service(model_dir, sharded, encode=FP32, verify=True)
