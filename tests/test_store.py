"""Vector stores (Milvus Lite, embedded): `sbmoe index --store` on a real SciFact slice, searched through
the CLI, `evaluate --index` and `serve`, against FAISS exact search on the same model's embeddings."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_top_k, load_service

from sbmoe.cli.main import main
from sbmoe.config.jobs import EncodeConfig, ServeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.errors import MissingInputError, UsageError
from sbmoe.data.beir import load_collection
from sbmoe.evaluation.metrics import read_trec_run
from sbmoe.inference.encoding import encode_pooled, encode_texts
from sbmoe.inference.routing import route
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import Index, open_index
from sbmoe.retrieval.faiss.files import IndexMismatchError
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.milvus.collection import EXPERT_FIELD, GATE_FIELD, ID_FIELD, segment_searched_as_built
from sbmoe.retrieval.milvus.store import MilvusStore
from sbmoe.retrieval.milvus.uri import is_store_uri, parse_store_uri

pytest.importorskip("pymilvus")
pytest.importorskip("milvus_lite")
FP32 = EncodeConfig(precision="fp32", backend="torch", device="cpu")
ENCODE_FLAGS = ["--precision", "fp32", "--backend", "torch", "--device", "cpu"]
SRC = str(Path(__file__).resolve().parents[1] / "src")
# Child processes import this checkout's sbmoe, whatever is installed.
ENVIRONMENT = {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def make_model(tiny_bert_dir: Path, directory: Path, experts: int, seed: int) -> Path:
    torch.manual_seed(seed)
    retriever = Retriever.from_config(
        ModelConfig(backbone=str(tiny_bert_dir), num_experts=experts), device="cpu"
    )
    retriever.save(directory)
    return directory


@pytest.fixture(scope="module")
def model_dir(tiny_bert_dir, tmp_path_factory):
    return make_model(tiny_bert_dir, tmp_path_factory.mktemp("store") / "moe", experts=3, seed=0)


@pytest.fixture(scope="module")
def faiss_dir(model_dir, scifact_slice, tmp_path_factory):
    directory = tmp_path_factory.mktemp("store") / "faiss"
    command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice), "--output"]
    assert main([*command, str(directory), *ENCODE_FLAGS]) == 0
    return directory


@pytest.fixture(scope="module")
def store_uri(model_dir, scifact_slice, tmp_path_factory):
    """A finished Milvus Lite store of the slice, written by `sbmoe index --store` in two shards."""
    uri = f"milvus:{tmp_path_factory.mktemp('store') / 'corpus.db'}?collection=scifact"
    command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice), "--store", uri]
    assert main([*command, "--shard", "0/2", *ENCODE_FLAGS]) == 0
    # Half the corpus is in: searching is refused until the other shard is written.
    with pytest.raises(UsageError, match="indexing has not finished"):
        open_index(uri)
    assert main([*command, "--shard", "1/2", *ENCODE_FLAGS]) == 0
    return uri


@pytest.fixture
def new_store(tmp_path) -> Callable[[str], str]:
    """URIs of stores no test has written: collection NAME of a Milvus Lite file of this test's own
    (test_store_server.py: of the server)."""
    return lambda name: f"milvus:{tmp_path / 'stores.db'}?collection={name}"


def run_cli_search(model_dir, index, queries_file, output):
    command = [
        "-q",
        "search",
        "--model",
        str(model_dir),
        "--index",
        str(index),
        "--queries",
        str(queries_file),
    ]
    assert main([*command, "--top-k", "10", "--output", str(output), *ENCODE_FLAGS]) == 0
    return read_trec_run(output)


def test_store_uris_parse_or_fail_in_one_line(tmp_path):
    lite = parse_store_uri("milvus:runs/corpus.db?collection=scifact")
    assert lite.is_embedded and lite.path == os.path.abspath("runs/corpus.db")
    assert lite.collection == "scifact"
    assert parse_store_uri("milvus:///data/x.db").path == "/data/x.db"
    assert parse_store_uri("milvus:///data/x.db").collection == "sbmoe"
    server = parse_store_uri("milvus://vectors.example:19531/research?collection=c1&tls=1")
    assert not server.is_embedded
    assert (server.address, server.database, server.collection) == (
        "https://vectors.example:19531",
        "research",
        "c1",
    )
    assert parse_store_uri("milvus://localhost").address == "http://localhost:19530"
    spread = parse_store_uri("milvus://db:19530?collection=nq&shards=8&replicas=2")
    assert (spread.shards, spread.replicas) == (8, 2) and lite.shards is None
    assert is_store_uri("milvus:x.db") and not is_store_uri(str(tmp_path)) and not is_store_uri(tmp_path)
    for bad, message in (
        ("milvus:corpus.sqlite", "ending in .db"),
        ("milvus:x.db?collection=1abc", "must start with a letter"),
        ("milvus:x.db?colection=a", "unknown parameter 'colection'"),
        ("milvus:x.db?tls=1", "tls applies to a server"),
        ("milvus:x.db?shards=2", "shards applies to a server"),
        ("milvus://db:19530?replicas=0", "replicas must be a positive integer"),
        ("milvus://db:port", "the port must be a number"),
    ):
        with pytest.raises(UsageError, match=message):
            parse_store_uri(bad)


def test_a_write_job_waits_for_growing_segments_and_for_an_approximate_index_on_the_others():
    """What a server's query nodes report (pymilvus's own messages) against what finish_writing
    waits for. At 1M vectors a server seals segments while a job still writes and serves them with
    no index listed; FLAT searches them exactly, HNSW and IVF only once their index is loaded."""
    from pymilvus.grpc_gen.common_pb2 import SegmentState
    from pymilvus.grpc_gen.milvus_pb2 import QuerySegmentInfo

    def segment(state: int, rows: int, index_name: str = "") -> QuerySegmentInfo:
        return QuerySegmentInfo(segmentID=1, num_rows=rows, index_name=index_name, state=state)

    sealed, flushed, growing = SegmentState.Sealed, SegmentState.Flushed, SegmentState.Growing
    assert segment_searched_as_built(segment(sealed, 348_160), exact=True)
    assert not segment_searched_as_built(segment(sealed, 348_160), exact=False)
    assert segment_searched_as_built(segment(flushed, 348_160, "embedding"), exact=False)
    assert segment_searched_as_built(segment(sealed, 1_000), exact=False)  # too small for Milvus to index
    assert not segment_searched_as_built(segment(growing, 1_000, "embedding"), exact=True)
    assert not segment_searched_as_built(segment(growing, 10), exact=False)


def test_cli_search_over_the_store_equals_faiss_exact(
    model_dir, faiss_dir, store_uri, scifact_slice, tmp_path
):
    store = open_index(store_uri, expected_fingerprint=Retriever.load(str(model_dir)).fingerprint())
    assert isinstance(store, MilvusStore) and isinstance(store, Index)
    faiss_index = DenseIndex.load(faiss_dir)
    assert len(store) == len(faiss_index) == len(load_collection(scifact_slice).corpus)
    assert sorted(store.doc_ids) == sorted(faiss_index.doc_ids)
    assert store.index_type == "flat" and store.metadata["collection"] == faiss_index.metadata["collection"]

    queries = scifact_slice / "queries.jsonl"
    expected = run_cli_search(model_dir, faiss_dir, queries, tmp_path / "faiss.trec")
    got = run_cli_search(model_dir, store_uri, queries, tmp_path / "store.trec")
    assert len(expected) == 64 and all(len(hits) == 10 for hits in got.values())
    assert_same_top_k(expected, got)

    # The same queries' embeddings through the Python API: exclude_self and small batches agree too.
    retriever = Retriever.load(str(model_dir))
    texts = list(load_collection(scifact_slice).queries.values())
    embeddings = encode_texts(retriever, texts, "query", FP32)
    ids = list(faiss_index.doc_ids[: len(texts)])  # query ids equal to doc ids: exclude_self drops them
    assert_same_top_k(
        faiss_index.search(embeddings, 7, ids, exclude_self=True),
        store.search(embeddings, 7, ids, exclude_self=True, batch_size=5),
    )


def test_evaluate_index_scores_the_store_as_faiss_and_exact_search(
    model_dir, faiss_dir, store_uri, scifact_slice, tmp_path
):
    metrics = {}
    for name, extra in (
        ("exact", []),
        ("faiss", ["--index", str(faiss_dir)]),
        ("store", ["--index", store_uri]),
    ):
        command = ["-q", "evaluate", "--model", str(model_dir), "--data", str(scifact_slice)]
        assert main([*command, "--output", str(tmp_path / name), *extra, *ENCODE_FLAGS]) == 0
        scores = json.loads((tmp_path / name / "metrics.json").read_text())
        metrics[name] = {key: value for key, value in scores.items() if isinstance(value, float)}
    assert metrics["exact"]["ndcg@10"] > 0
    for name in ("faiss", "store"):
        assert metrics[name] == pytest.approx(metrics["exact"], abs=1e-6), name
    config = json.loads((tmp_path / "store" / "config.json").read_text())
    assert config["evaluate_config"]["corpus_index"] == store_uri
    # The store holds the model's own rule only: other rules need the corpus encoded under each.
    command = [
        "-q",
        "evaluate",
        "--model",
        str(model_dir),
        "--data",
        str(scifact_slice),
        "--index",
        store_uri,
    ]
    assert main([*command, "--output", str(tmp_path / "rules"), "--expert-pooling", "all", "top1"]) == 2


def test_store_carries_each_documents_routing(model_dir, store_uri, scifact_slice):
    retriever = Retriever.load(str(model_dir))
    corpus = load_collection(scifact_slice).corpus
    doc_ids = list(corpus)[:12]
    pooled = encode_pooled(retriever, [corpus[d].full_text for d in doc_ids], "document", FP32)
    experts, gates = route(retriever, pooled)
    store = open_index(store_uri)
    rows = store._client.query(
        store.uri.collection,
        filter=f"{ID_FIELD} in [{','.join(json.dumps(d) for d in doc_ids)}]",
        output_fields=[ID_FIELD, EXPERT_FIELD, GATE_FIELD],
    )
    by_id = {row[ID_FIELD]: row for row in rows}
    assert [by_id[d][EXPERT_FIELD] for d in doc_ids] == experts.tolist()
    np.testing.assert_allclose([by_id[d][GATE_FIELD] for d in doc_ids], gates.numpy(), atol=1e-6)
    assert store.meta["experts"] == 3
    # Filtering by expert is the engine's own: documents routed to expert 0.
    routed = store._client.query(
        store.uri.collection, filter=f"{EXPERT_FIELD} == 0", output_fields=[ID_FIELD]
    )
    assert {row[ID_FIELD] for row in routed} >= {
        d for d, e in zip(doc_ids, experts.tolist(), strict=True) if e == 0
    }


def test_serve_over_the_store_ranks_as_faiss(model_dir, faiss_dir, store_uri, scifact_slice):
    pytest.importorskip("fastapi")
    from test_serve import request

    from sbmoe.serving.http import BackgroundServer, create_app

    texts = list(load_collection(scifact_slice).queries.values())[:6]
    answers = {}
    for name, index in (("faiss", faiss_dir), ("store", store_uri)):
        service = load_service(model_dir, index, encode=FP32, data=scifact_slice)
        with BackgroundServer(create_app(service, ServeConfig(max_top_k=50, max_texts=8))) as running:
            status, info = request(f"{running.url}/info")
            assert status == 200 and info["index"]["size"] == len(load_collection(scifact_slice).corpus)
            status, answer = request(f"{running.url}/search", {"queries": texts, "top_k": 10})
            assert status == 200
        answers[name] = {
            str(n): {hit["id"]: hit["score"] for hit in result["hits"]}
            for n, result in enumerate(answer["results"])
        }
    assert info["index"]["type"] == "flat" and info["index"]["path"] == store_uri
    assert_same_top_k(answers["faiss"], answers["store"])


def test_a_store_of_another_model_is_refused(
    tiny_bert_dir, store_uri, new_store, scifact_slice, tmp_path, capsys
):
    other = make_model(tiny_bert_dir, tmp_path / "other", experts=3, seed=1)
    with pytest.raises(IndexMismatchError, match="different model"):
        open_index(store_uri, expected_fingerprint=Retriever.load(str(other)).fingerprint())
    search = ["-q", "search", "--model", str(other), "--index", store_uri, "--query", "vitamin d"]
    assert main([*search, *ENCODE_FLAGS]) == 2
    assert "was built by a different model" in capsys.readouterr().err
    # Writing another model's vectors into it is refused as well, unless --overwrite replaces it.
    uri = new_store("other")
    command = ["-q", "index", "--data", str(scifact_slice), "--store", uri, *ENCODE_FLAGS]
    assert main([*command, "--model", str(tiny_bert_dir)]) == 0
    assert main([*command, "--model", str(other)]) == 2
    assert "different model" in capsys.readouterr().err
    assert main([*command, "--model", str(other), "--overwrite"]) == 0
    assert open_index(uri, Retriever.load(str(other)).fingerprint()).meta["experts"] == 3
    with pytest.raises(MissingInputError, match="no collection 'nope"):
        open_index(new_store("nope"))


KILLABLE_INDEX = """
import sys
import sbmoe.retrieval.milvus.indexing as job
from sbmoe.cli.main import main
from sbmoe.retrieval.milvus.store import MilvusStore

job.INDEX_CHUNK_SIZE = 10  # many small chunks, so the kill lands between two of them
upsert = MilvusStore.upsert

def announced_upsert(self, doc_ids, *args):
    upsert(self, doc_ids, *args)
    print("wrote", len(doc_ids), flush=True)

MilvusStore.upsert = announced_upsert
sys.exit(main(sys.argv[1:]))
"""


def kill_an_index_job_after_three_writes(model_dir: Path, scifact_slice: Path, uri: str) -> list[str]:
    """Start ``sbmoe index --store URI`` (10 documents a write), SIGKILL it after its third write;
    its command line, to run again."""
    command = [
        sys.executable,
        "-c",
        textwrap.dedent(KILLABLE_INDEX),
        "-q",
        "index",
        "--model",
        str(model_dir),
    ]
    command += ["--data", str(scifact_slice), "--store", uri, *ENCODE_FLAGS]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENVIRONMENT
    )
    lines = [process.stdout.readline() for _ in range(3)]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL and lines == ["wrote 10\n"] * 3
    return command


def assert_the_rerun_stored_every_document_once(printed: str, scifact_slice: Path, uri: str) -> None:
    summary = re.search(r"(\d+) written, (\d+) already there; the store holds (\d+) of (\d+)", printed)
    written, already, stored, total = map(int, summary.groups())
    corpus = list(load_collection(scifact_slice).corpus)
    assert already >= 30 and written + already == stored == total == len(corpus)
    with open_index(uri) as store:
        assert len(store) == len(corpus)
        assert sorted(store.iter_doc_ids(page=7)) == sorted(corpus)  # each document exactly once


def test_kill_9_during_index_store_then_the_same_command_stores_every_document_once(
    model_dir, scifact_slice, tmp_path
):
    uri = f"milvus:{tmp_path / 'killed.db'}"
    command = kill_an_index_job_after_three_writes(model_dir, scifact_slice, uri)
    finished = subprocess.run(command, capture_output=True, text=True, env=ENVIRONMENT, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert_the_rerun_stored_every_document_once(finished.stdout, scifact_slice, uri)


def test_without_the_extra_index_store_names_it_in_one_line(
    scifact_slice, model_dir, tmp_path, monkeypatch, capfd
):
    # An honest import failure: `import pymilvus` raises ImportError when sys.modules holds None
    # (in this process: monkeypatch puts the real module back afterwards).
    monkeypatch.setitem(sys.modules, "pymilvus", None)
    command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice)]
    capfd.readouterr()
    returncode = main([*command, "--store", f"milvus:{tmp_path / 'x.db'}"])
    result = subprocess.CompletedProcess(command, returncode, *capfd.readouterr())
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "sbmoe index: error: vector stores need the pymilvus package: install the 'store' extra with "
        "`pip install 'sbmoe[store]'`"
    ]
    assert not (tmp_path / "x.db").exists()


def test_a_query_side_model_routes_no_document_and_searches_the_backbones_store(
    tiny_bert_dir, scifact_slice, new_store, tmp_path
):
    torch.manual_seed(0)
    config = ModelConfig(backbone=str(tiny_bert_dir), num_experts=3, head_side="query")
    Retriever.from_config(config, device="cpu").save(tmp_path / "query-side")
    command = ["-q", "index", "--data", str(scifact_slice), *ENCODE_FLAGS]
    own, backbone = new_store("own"), new_store("backbone")
    assert main([*command, "--model", str(tmp_path / "query-side"), "--store", own]) == 0
    assert open_index(own).meta["experts"] == 0  # documents skip the head: no expert fields
    assert main([*command, "--model", str(tiny_bert_dir), "--store", backbone]) == 0
    search = ["-q", "search", "--index", backbone, "--query", "vitamin d", *ENCODE_FLAGS]
    assert main([*search, "--model", str(tmp_path / "query-side")]) == 0


def sbmoe_process(*argv: str) -> subprocess.CompletedProcess:
    """``sbmoe -q ARGV`` in its own process: stderr as a user sees it, libraries' own handlers too."""
    command = [sys.executable, "-m", "sbmoe.cli", "-q", *argv]
    return subprocess.run(command, capture_output=True, text=True, env=ENVIRONMENT, timeout=600)


def index_store(model_dir: Path, scifact_slice: Path, path: Path) -> subprocess.CompletedProcess:
    return sbmoe_process(
        "index",
        "--model",
        str(model_dir),
        "--data",
        str(scifact_slice),
        "--store",
        f"milvus:{path}",
        *ENCODE_FLAGS,
    )


def index_store_here(
    model_dir: Path, scifact_slice: Path, path: Path, capfd, caplog
) -> subprocess.CompletedProcess:
    """The same command in this process (no second torch import), for refusals made before any
    Milvus code runs; ``capfd`` takes the file descriptors' output too, so what a library writes is
    in ``stderr``.
    A library's log record that would reach stderr through logging's last resort in a process of
    its own reaches pytest's handler here instead: none may carry a traceback either."""
    argv = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice)]
    capfd.readouterr()
    caplog.clear()
    code = main([*argv, "--store", f"milvus:{path}", *ENCODE_FLAGS])
    out, err = capfd.readouterr()
    assert not [r for r in caplog.records if r.exc_info and r.levelno >= logging.WARNING], caplog.text
    return subprocess.CompletedProcess(argv, code, out, err)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a refused command ends with (exit 2, no traceback)."""
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("sbmoe index: error: "), result.stderr
    return line


def test_index_store_into_a_file_prints_no_traceback(model_dir, scifact_slice, tmp_path):
    """Milvus Lite's in-process gRPC server logged a NotImplementedError traceback (AllocTimestamp,
    asked for while pymilvus waits for the index) on every successful `index --store`."""
    result = index_store(model_dir, scifact_slice, tmp_path / "x.db")
    documents = len(load_collection(scifact_slice).corpus)
    assert result.returncode == 0 and f"holds {documents} of {documents}" in result.stdout, result.stderr
    assert "Traceback" not in result.stderr and "NotImplementedError" not in result.stderr, result.stderr


@pytest.fixture
def read_only_folder(tmp_path) -> Iterator[tuple[Path, str]]:
    """A folder nothing can be written in, and the cause sbmoe must name: a read-only tmpfs mounted
    on it as root (root writes through permissions), else its own permissions."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield folder, f"you have no permission to write in {folder}"
        finally:
            folder.chmod(0o755)
        return
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs as root: {mounted.stderr.strip()}")
    try:
        yield folder, f"{folder} is on a read-only file system"
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_store_in_a_read_only_folder_is_refused_naming_that_cause(
    model_dir, scifact_slice, read_only_folder
):
    """Before, blamed on "another sbmoe process" holding the database. In a process of its own:
    Milvus Lite starts there and fails, and what it leaves on stderr up to the exit counts."""
    folder, cause = read_only_folder
    line = error_line(index_store(model_dir, scifact_slice, folder / "corpus.db"))
    assert cause in line and "another sbmoe" not in line, line


def test_a_store_path_that_is_the_users_file_is_refused_and_left_unchanged(
    model_dir, scifact_slice, tmp_path, capfd, caplog
):
    """Before, blamed on "another sbmoe process" holding the database."""
    mine = tmp_path / "notes.db"
    mine.write_text("precious", encoding="utf-8")
    line = error_line(index_store_here(model_dir, scifact_slice, mine, capfd, caplog))
    assert f"{mine} is a file, not a Milvus Lite database" in line and "nothing was changed" in line, line
    assert mine.read_text(encoding="utf-8") == "precious"
