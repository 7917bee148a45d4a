"""Vector stores on a Milvus server: the ``milvus`` package's standalone server (C++ engine, embedded
etcd, local storage), started once per session by conftest's ``milvus_server``.

Every Milvus Lite case of test_store.py that a server can run runs here again, unchanged: those that
search a finished store, on a collection of the server (this module's ``store_uri``, written by
shard jobs running at once), and those that write stores of their own, on new collections (this
module's ``new_store``). Left to Lite: the URI parser, the missing extra, and store paths that are
files or folders. Then what a server adds: its index types, a killed job resumed, and a server that
is down, refuses, or stops answering, each ending in one line.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable

import numpy as np
import pytest
import test_store
from milvus_server import free_port
from test_store import (
    ENCODE_FLAGS,
    ENVIRONMENT,
    FP32,
    assert_the_rerun_stored_every_document_once,
    kill_an_index_job_after_three_writes,
)

from sbmoe.cli.main import main
from sbmoe.core.errors import UsageError
from sbmoe.data.beir import load_collection
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import open_index
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.milvus.collection import VECTOR_FIELD, StoreServerError

# test_store's fixtures and its cases that search a finished store, collected here again: with this
# module's store_uri, they run on the server.
model_dir = test_store.model_dir
faiss_dir = test_store.faiss_dir
test_cli_search_over_the_store_equals_faiss_exact = (
    test_store.test_cli_search_over_the_store_equals_faiss_exact
)
test_evaluate_index_scores_the_store_as_faiss_and_exact_search = (
    test_store.test_evaluate_index_scores_the_store_as_faiss_and_exact_search
)
test_store_carries_each_documents_routing = test_store.test_store_carries_each_documents_routing
test_serve_over_the_store_ranks_as_faiss = test_store.test_serve_over_the_store_ranks_as_faiss
# ... and those that write stores of their own, with this module's new_store.
test_a_store_of_another_model_is_refused = test_store.test_a_store_of_another_model_is_refused
test_a_query_side_model_routes_no_document_and_searches_the_backbones_store = (
    test_store.test_a_query_side_model_routes_no_document_and_searches_the_backbones_store
)


@pytest.fixture
def new_store(milvus_server) -> Callable[[str], str]:
    """URIs of collections no test has written, on the server."""
    return lambda name: f"milvus://{milvus_server.address}?collection={name}_{uuid.uuid4().hex[:8]}"


def index_command(model_dir, scifact_slice, uri: str, *extra: str) -> list[str]:
    """``sbmoe -q index --store URI`` as its own process."""
    command = [sys.executable, "-m", "sbmoe.cli", "-q", "index", "--model", str(model_dir)]
    return [*command, "--data", str(scifact_slice), "--store", uri, *ENCODE_FLAGS, *extra]


@pytest.fixture(scope="module")
def store_uri(milvus_server, model_dir, scifact_slice):
    """The slice in a server collection: shard 0/3 first (searching it is refused), then shards 1/3
    and 2/3 by two `sbmoe index --store` processes writing the collection at the same time."""
    uri = f"milvus://{milvus_server.address}?collection=scifact"
    command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice), "--store", uri]
    assert main([*command, "--shard", "0/3", *ENCODE_FLAGS]) == 0
    with pytest.raises(UsageError, match="indexing has not finished"):
        open_index(uri)
    jobs = [
        subprocess.Popen(
            index_command(model_dir, scifact_slice, uri, "--shard", f"{shard}/3"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENVIRONMENT,
        )
        for shard in (1, 2)
    ]
    for job in jobs:
        _, stderr = job.communicate(timeout=600)
        assert job.returncode == 0, stderr
    return uri


def test_hnsw_and_ivf_on_the_server_find_the_exact_neighbours(
    milvus_server, model_dir, faiss_dir, scifact_slice
):
    retriever = Retriever.load(str(model_dir))
    queries = encode_texts(retriever, list(load_collection(scifact_slice).queries.values()), "query", FP32)
    expected = DenseIndex.load(faiss_dir).search(queries, 10)
    for index_type, engine_name in (("hnsw", "HNSW"), ("ivf", "IVF_FLAT")):
        uri = f"milvus://{milvus_server.address}?collection=scifact_{index_type}"
        command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice), "--store", uri]
        assert main([*command, "--index-type", index_type, *ENCODE_FLAGS]) == 0
        with open_index(uri) as store:
            described = store._client.describe_index(store.uri.collection, VECTOR_FIELD)
            assert store.index_type == index_type and described["index_type"] == engine_name
            assert described["indexed_rows"] == described["total_rows"] == len(store)  # sealed, indexed
            got = store.search(queries, 10)
        # A hundred documents: the approximate indexes find (nearly) every exact neighbour.
        found = sum(len(set(got[q]) & set(hits)) for q, hits in expected.items())
        assert found >= 0.95 * sum(len(hits) for hits in expected.values()), index_type


def test_kill_9_during_index_on_the_server_then_the_rerun_resumes(
    milvus_server, model_dir, scifact_slice, capsys
):
    uri = f"milvus://{milvus_server.address}?collection=killed"
    command = kill_an_index_job_after_three_writes(model_dir, scifact_slice, uri)
    assert main(command[3:]) == 0  # the same command again, in this process
    assert_the_rerun_stored_every_document_once(capsys.readouterr().out, scifact_slice, uri)


def test_a_server_that_is_down_refuses_or_does_not_answer_ends_in_one_line(
    milvus_server, model_dir, scifact_slice, capsys
):
    def error(uri: str) -> str:
        command = ["-q", "index", "--model", str(model_dir), "--data", str(scifact_slice), "--store", uri]
        assert main([*command, *ENCODE_FLAGS]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert lines[-1].startswith("sbmoe index: error: ") and "Traceback" not in lines, lines
        return lines[-1]

    with socket.socket() as silent:  # accepts connections and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        line = error(f"milvus://127.0.0.1:{port}?collection=c&timeout=2")
        assert f"the Milvus server at http://127.0.0.1:{port} did not answer within 2 s" in line, line
    line = error(f"milvus://127.0.0.1:{free_port()}?collection=c")
    assert "could not connect to a Milvus server at http://127.0.0.1:" in line, line
    line = error(f"milvus://{milvus_server.address}/nowhere?collection=c")
    assert f"the Milvus server at http://{milvus_server.address} has no database 'nowhere'" in line, line


def test_a_server_that_stops_answering_mid_search_ends_in_one_line(milvus_server, store_uri):
    with open_index(f"{store_uri}&timeout=2") as store:
        query = np.ones((1, store.dim), dtype=np.float32)
        os.kill(milvus_server.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreServerError, match="did not answer search within 2 s"):
                store.search(query, 5)
        finally:
            os.kill(milvus_server.pid, signal.SIGCONT)
        assert len(store.search(query, 5)["0"]) == 5  # and it answers again
