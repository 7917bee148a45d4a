"""`sbmoe serve` over real HTTP on loopback: a tiny MoE model and its index of a real SciFact slice."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_top_k, load_service

from sbmoe import __version__
from sbmoe.cli.main import main
from sbmoe.config.jobs import EncodeConfig, ServeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.cpu import usable_cores
from sbmoe.core.errors import SbmoeError, UsageError
from sbmoe.data.beir import BeirCollection, load_collection
from sbmoe.evaluation.metrics import read_trec_run
from sbmoe.inference.encoding import encode_pooled, encode_texts
from sbmoe.inference.routing import route
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.indexing import build_index
from sbmoe.retrieval.search import search
from sbmoe.serving.http import BackgroundServer, create_app
from sbmoe.serving.service import SearchService, ServiceClosedError

pytest.importorskip("fastapi")
FP32 = EncodeConfig(precision="fp32", backend="torch", device="cpu")
ENCODE_FLAGS = ["--precision", "fp32", "--backend", "torch", "--device", "cpu"]
LIMITS = ServeConfig(max_top_k=50, max_texts=8)


def request(url: str, payload: dict | None = None, headers: dict | None = None) -> tuple[int, dict]:
    """POST ``payload`` as JSON (GET without one); the status and the decoded JSON answer."""
    status, body = raw_request(url, payload, headers)
    return status, json.loads(body)


def raw_request(url: str, payload: dict | None = None, headers: dict | None = None) -> tuple[int, bytes]:
    """As :func:`request`, the answer's body as sent (bytes)."""
    data = json.dumps(payload).encode() if payload is not None else None
    headers = {"Content-Type": "application/json", **(headers or {})}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data, headers), timeout=60) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def send(
    url: str, path: str, data: bytes, headers: dict | None = None, chunked: bool = False
) -> tuple[int, dict]:
    """POST raw ``data`` to ``path`` (chunked: without a Content-Length); the status and JSON answer."""
    address = urllib.parse.urlparse(url)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
    try:
        body = iter([data[i : i + 65536] for i in range(0, len(data), 65536)]) if chunked else data
        connection.request("POST", path, body, {"Content-Type": "application/json"}, encode_chunked=chunked)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        connection.close()


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
    pooled = encode_pooled(service.retriever, [text], "query", FP32)
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
        # Python's JSON reads NaN and Infinity: refused by name, not a crash in the error's echo.
        ("search", {"query": "q", "top_k": float("nan")}, "top_k: Input should be a valid integer"),
        ("search", {"query": "q", "top_k": float("inf")}, "top_k: Input should be a valid integer"),
        ("search", {"query": float("nan")}, "query: Input should be a valid string"),
        ("search", {"query": "q", "documents": float("-inf")}, "documents: Input should be a valid boolean"),
        ("embed", {"texts": ["q", float("nan")]}, "texts.1: Input should be a valid string"),
        # A lone surrogate (JSON "\\ud800") is no text: refused by name, not a 500 from the tokenizer.
        ("search", {"query": "a \ud800 b"}, "query: Value error, the text holds a lone UTF-16 surrogate"),
        ("embed", {"texts": ["q", "\udc00"]}, "texts.1: Value error, the text holds a lone UTF-16 surrogate"),
    ],
)
def test_bad_requests_get_422_with_the_reason(server, path, payload, message):
    running, _ = server
    status, body = request(f"{running.url}/{path}", payload)
    assert status == 422
    assert message in body["detail"] and "\n" not in body["detail"]


@pytest.mark.parametrize(
    ("data", "message"),
    [(b'{"query": "q", ', "JSON decode error"), (b"[" * 50_000 + b"]" * 50_000, "error parsing the body")],
)
def test_malformed_json_gets_a_4xx(server, data, message):
    running, _ = server
    status, body = send(running.url, "/search", data)
    assert 400 <= status < 500 and message in body["detail"]


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
    assert info["limits"] == {"max_top_k": 50, "max_texts": 8, "max_request_bytes": 1 << 20}
    assert info["in_progress"] == 1  # this request


def _server_side(client: socket.socket) -> socket.socket:
    """The server's end of ``client``'s connection, found among this process's descriptors."""
    for name in os.listdir("/proc/self/fd"):
        try:
            candidate = socket.socket(fileno=os.dup(int(name)))
        except OSError:  # not a socket
            continue
        try:
            if candidate.type == socket.SOCK_STREAM and candidate.getpeername() == client.getsockname():
                return candidate
        except OSError:  # a listening or unconnected socket
            pass
        candidate.close()
    raise AssertionError(f"no socket of this process is connected to {client.getsockname()}")


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="finds the server's socket through /proc")
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_every_accepted_connection_has_nagle_off(server, model_dir, index_dir, family):
    """A response written in two parts must not wait for the client's delayed ACK (40 ms)."""
    if family == socket.AF_INET6 and not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    running, _ = server
    if family == socket.AF_INET6:  # a socket of another family, made by other code than the fixture's
        try:
            running = BackgroundServer(create_app(load_service(model_dir, index_dir, encode=FP32)), "::1")
        except UsageError as error:
            pytest.skip(f"no IPv6 loopback: {error}")
    with running if family == socket.AF_INET6 else contextlib.nullcontext(running):
        address = urllib.parse.urlparse(running.url)
        connection = http.client.HTTPConnection(address.hostname, address.port, timeout=60)
        connection.request("GET", "/health")
        assert connection.getresponse().read() == b'{"status":"ok"}'
        served = _server_side(connection.sock)
        try:
            assert served.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        finally:
            served.close()
            connection.close()


def test_without_the_collection_or_a_head_the_extras_are_refused(server, tiny_bert_dir, index_dir):
    _, service = server
    bare = SearchService(service.retriever, service.index, encode=FP32)
    with BackgroundServer(create_app(bare)) as running:
        status, body = request(f"{running.url}/search", {"query": "q", "documents": True})
        assert status == 400 and "--data" in body["detail"]
        status, body = request(f"{running.url}/search", {"query": "q", "top_k": 2})
        assert status == 200 and len(body["results"][0]["hits"]) == 2
    with pytest.raises(UsageError, match="documents are not in the collection nfcorpus"):
        other = BeirCollection("nfcorpus", Path("nfcorpus"), {"MED-10": None}, {}, {})
        SearchService(service.retriever, service.index, collection=other)
    plain = Retriever.from_config(ModelConfig(backbone=str(tiny_bert_dir), num_experts=0), device="cpu")
    index = build_index(plain, {"d1": "one text", "d2": "another"}, encode=FP32)
    with SearchService(plain, index, encode=FP32) as headless, pytest.raises(UsageError, match="no MoE head"):
        headless.search(["q"], routing=True)


@pytest.mark.parametrize(
    "encode", [FP32, EncodeConfig(backend="onnx", precision="int8", device="cpu")], ids=["fp32", "int8"]
)
def test_waiting_requests_are_answered_together_each_as_alone(server, index_dir, scifact_slice, encode):
    _, service = server
    texts = list(load_collection(scifact_slice).queries.values())[:24]
    with SearchService(service.retriever, service.index, encode=encode) as serving:
        alone = [serving.search([text]).result(timeout=60)[0] for text in texts]
        embedded_alone = [serving.embed([text]).result(timeout=60) for text in texts]
        before = dict(serving.stats)
        # Submitted faster than one encoding takes: the worker finds them waiting and takes them in
        # one round; int8 too (its activation scales are per batch, but every text is encoded alone).
        futures = [serving.search([text]) for text in texts]
        pairs = [serving.search(texts[n : n + 2]) for n in range(0, len(texts), 2)]
        embedded = serving.embed(texts)
        assert [future.result(timeout=60)[0] for future in futures] == alone
        assert [result for pair in pairs for result in pair.result(timeout=60)] == alone
        assert embedded.result(timeout=60).tobytes() == np.concatenate(embedded_alone).tobytes()
        assert serving.stats["requests"] - before["requests"] == len(texts) + len(pairs) + 1
        assert serving.stats["batches"] - before["batches"] < len(texts) + len(pairs) + 1
    if encode is FP32:
        expected = search(
            service.retriever, service.index, {str(n): t for n, t in enumerate(texts)}, encode=FP32
        )
        assert_same_top_k(expected, {str(n): dict(result.hits) for n, result in enumerate(alone)})


@pytest.mark.parametrize("workers", [1, 2])
def test_an_onnx_service_encodes_on_each_workers_share_of_the_cores(server, workers):
    """Each worker its own session on its share of the threads: not the caller's thread count, and
    not one session whose thread pool every worker's passes would share."""
    _, service = server
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cores() + 1)  # what the service's constructor finds: no worker's share
    try:
        onnx = EncodeConfig(backend="onnx", precision="fp32", device="cpu")
        config = ServeConfig(workers=workers)
        with SearchService(service.retriever, service.index, encode=onnx, config=config) as serving:
            sessions = {
                id(encoder._backbone.session): encoder._backbone.session for encoder in serving._encoders
            }
            assert len(sessions) == workers
            for session in sessions.values():
                assert session.get_session_options().intra_op_num_threads == serving.threads_per_worker
            text = "vitamin D and depression"
            (onnx_result,), (torch_result,) = (
                way.search([text]).result(timeout=60) for way in (serving, service)
            )
            assert [doc for doc, _ in onnx_result.hits] == [doc for doc, _ in torch_result.hits]
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("precision", ["auto", "fp32"])
def test_a_query_gets_the_same_bytes_alone_and_among_concurrent_requests(
    model_dir, index_dir, scifact_slice, precision
):
    """The body of a request does not depend on what the service was answering meanwhile."""
    texts = list(load_collection(scifact_slice).queries.values())[:16]
    encode = EncodeConfig(precision=precision, device="cpu")
    service = load_service(model_dir, index_dir, encode=encode, data=scifact_slice)
    with BackgroundServer(create_app(service, ServeConfig(max_top_k=50, max_texts=16))) as running:
        url = f"{running.url}/search"
        asked = [{"query": text, "top_k": 10, "routing": True} for text in texts]
        alone = [raw_request(url, payload) for payload in asked]
        # The same requests again, each among batches of the other queries, from 8 threads at once.
        company = [{"queries": texts[n:] + texts[:n], "top_k": 10, "routing": True} for n in range(8)]
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda payload: raw_request(url, payload), (company + asked) * 2))
    for answer in answers[len(company) : len(company) + len(asked)] + answers[-len(asked) :]:
        assert answer[0] == 200
    assert answers[len(company) : len(company) + len(asked)] == alone == answers[-len(asked) :]
    for n, (status, body) in enumerate(answers[: len(company)]):
        rotated = [json.loads(text)["results"][0] for _, text in alone[n:] + alone[:n]]
        assert status == 200 and json.loads(body)["results"] == rotated


def test_health_answers_as_long_as_the_workers_can_and_head_gets_no_body(model_dir, index_dir):
    service = load_service(model_dir, index_dir, encode=FP32)
    with BackgroundServer(create_app(service)) as running:
        connection = http.client.HTTPConnection(urllib.parse.urlsplit(running.url).netloc, timeout=60)
        connection.request("HEAD", "/health")
        answer = connection.getresponse()
        assert (answer.status, answer.read()) == (200, b"")
        connection.close()
        service.close()  # what a worker that died would leave: nobody to answer a search
        assert request(f"{running.url}/health") == (503, {"detail": "the search worker has stopped"})
        assert request(f"{running.url}/search", {"query": "vitamin D"})[0] == 503


def test_an_api_key_guards_every_endpoint_but_health(model_dir, index_dir, monkeypatch):
    monkeypatch.setenv("SBMOE_API_KEY", "from the environment")
    service = load_service(model_dir, index_dir, encode=FP32)
    with BackgroundServer(create_app(service, ServeConfig(api_key="s3cret key"))) as running:
        search_url, payload = f"{running.url}/search", {"query": "vitamin D", "top_k": 2}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "from the environment"}):
            status, body = request(search_url, payload, headers)
            assert status == 401 and "API key" in body["detail"]
        assert request(f"{running.url}/info", headers={"Authorization": "Bearer nope"})[0] == 401
        assert request(search_url, payload, {"Authorization": "Bearer s3cret key"})[0] == 200
        assert request(search_url, payload, {"X-API-Key": "s3cret key"})[0] == 200
        assert request(f"{running.url}/health") == (200, {"status": "ok"})
    service = load_service(model_dir, index_dir, encode=FP32)
    with BackgroundServer(create_app(service)) as running:  # no key given: the variable's
        assert request(f"{running.url}/info")[0] == 401
        assert request(f"{running.url}/info", headers={"X-API-Key": "from the environment"})[0] == 200
    monkeypatch.setenv("SBMOE_API_KEY", " ")
    with pytest.raises(UsageError, match="SBMOE_API_KEY is set but empty"):
        create_app(service)


@pytest.mark.parametrize("chunked", [False, True], ids=["declared", "chunked"])
def test_a_body_above_the_limit_gets_413(server, model_dir, index_dir, chunked):
    _, service = server
    bare = SearchService(service.retriever, service.index, encode=FP32)
    with BackgroundServer(create_app(bare, ServeConfig(max_request_bytes=2000))) as running:
        small = json.dumps({"query": "vitamin D " * 150, "top_k": 2}).encode()
        assert len(small) < 2000 and send(running.url, "/search", small, chunked=chunked)[0] == 200
        large = json.dumps({"query": "vitamin D " * 250, "top_k": 2}).encode()
        status, body = send(running.url, "/search", large, chunked=chunked)
        assert status == 413 and "larger than the limit of 2000 bytes" in body["detail"]


def test_while_stopping_new_requests_get_503_until_those_in_progress_are_answered(model_dir, index_dir):
    service = load_service(model_dir, index_dir, encode=FP32)
    app = create_app(service)
    running = BackgroundServer(app).__enter__()
    address = urllib.parse.urlparse(running.url)
    body = json.dumps({"query": "vitamin D", "top_k": 2}).encode()
    head = "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    slow = socket.create_connection((address.hostname, address.port), timeout=60)
    stopper = threading.Thread(target=running.stop)
    try:
        slow.sendall(head.encode() + body[:5])  # a request in progress: its body still coming
        wait_until(lambda: app.state.gate.in_flight == 1)
        stopper.start()
        wait_until(lambda: app.state.gate.stopping)
        for _ in range(3):  # still listening, refusing politely
            status, answer = request(f"{running.url}/search", {"query": "late", "top_k": 2})
            assert status == 503 and "stopping" in answer["detail"]
        assert service.alive
        slow.sendall(body[5:])
        reply = slow.makefile("rb").read().decode()
        assert reply.startswith("HTTP/1.1 200") and '"hits"' in reply
        stopper.join(timeout=60)
        assert not stopper.is_alive() and not service.alive
        with pytest.raises(OSError):
            socket.create_connection((address.hostname, address.port), timeout=5)
    finally:
        slow.close()
        if not stopper.is_alive():
            running.stop()


def wait_until(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


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


def start_command(model_dir, index_dir) -> tuple[subprocess.Popen, str]:
    """``sbmoe serve`` in a child process on a free port; the process and its URL."""
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
    for line in process.stdout:
        if line.startswith("listening on "):
            return process, line.split()[-1]
    process.kill()
    raise AssertionError(f"the server did not say where it listens: {process.communicate()[1]}")


def test_the_command_serves_until_interrupted(model_dir, index_dir):
    process, url = start_command(model_dir, index_dir)
    try:
        status, body = request(f"{url}/search", {"query": "vitamin D", "top_k": 2})
        assert status == 200 and len(body["results"][0]["hits"]) == 2
    finally:
        process.send_signal(signal.SIGINT)
        remaining = process.communicate(timeout=60)[1]
    assert process.returncode == 0, remaining


def test_sigterm_answers_503_until_the_request_in_progress_is_answered(model_dir, index_dir):
    process, url = start_command(model_dir, index_dir)
    address = urllib.parse.urlparse(url)
    body = json.dumps({"query": "vitamin D", "top_k": 2}).encode()
    head = "POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    try:
        with socket.create_connection((address.hostname, address.port), timeout=60) as slow:
            slow.sendall(head.encode() + body[:5])
            # In progress once the server has read its head: then /info counts it and itself.
            wait_until(lambda: request(f"{url}/info")[1]["in_progress"] == 2)
            process.send_signal(signal.SIGTERM)
            wait_until(lambda: raw_request(f"{url}/health")[0] == 503)
            status, answer = request(f"{url}/search", {"query": "late", "top_k": 2})
            assert status == 503 and "stopping" in answer["detail"]
            slow.sendall(body[5:])
            assert slow.makefile("rb").read().decode().startswith("HTTP/1.1 200")
        remaining = process.communicate(timeout=60)[1]
    finally:
        process.kill()
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
