"""Vector stores (Milvus Lite, a Milvus server) against FAISS on the same clustered vectors, side by side.

Loads ``--size`` unit vectors (drawn around random centres, as in ``bench_ann.py``) into FAISS
(``DenseIndex``, as ``sbmoe index`` builds it), into Milvus Lite and into a Milvus server
(``MilvusStore``, as ``sbmoe index --store`` writes it: upserts of 4,096 documents by id, then, on
the server, a flush and the wait for its index), each as an exact (flat) and an HNSW index (M 32,
efSearch 128) or, with ``--index-types``, an IVF index (the same nlist and nprobe on every side,
sbmoe's defaults for the corpus size), and prints one table: build time, memory, disk, recall@10
against exact search, queries/s with all queries in batches of 1,024 and one query at a time.

Each index is built and searched in a fresh process of its own (which draws the same vectors from
the same seed). "Memory" is that process's resident memory growth while it builds and loads the
index (Milvus Lite runs inside it: a gRPC server on loopback, the engine in Python over FAISS);
for the server, the growth of the server's process tree (the ``milvus`` package's standalone
Milvus, started once with ``milvus-server`` as docs/vector-stores.md shows, its own data folder and
port), and "disk" the growth of its data folder.

    .venv/bin/python bench/bench_store.py [--size 1000000] [--dim 384] [--queries 1000] [--single 50]
        [--index-types flat hnsw ivf] [--engines FAISS "Milvus Lite" "Milvus server"]
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import faiss
import numpy as np
from bench_ann import memory_mib, recall_at_k, vectors
from common import machine

from sbmoe.config.jobs import IndexConfig
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.indexing import INDEX_CHUNK_SIZE
from sbmoe.retrieval.milvus.collection import VECTOR_FIELD, store_meta
from sbmoe.retrieval.milvus.store import MilvusStore
from sbmoe.retrieval.milvus.uri import parse_store_uri

K = 10
ENGINES = ("FAISS", "Milvus Lite", "Milvus server")


def directory_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def timed(search: Callable[..., dict], queries: np.ndarray, ids: list[str], batch_size: int) -> tuple:
    started = time.perf_counter()
    run = search(queries, K, query_ids=ids, batch_size=batch_size)
    return run, len(queries) / (time.perf_counter() - started)


def build_faiss(docs: np.ndarray, doc_ids: list[str], index_type: str, folder: Path) -> tuple:
    """(index, build seconds, memory growth MiB, disk MiB)."""
    before, _ = memory_mib()
    started = time.perf_counter()
    index = DenseIndex(docs, doc_ids, "bench", IndexConfig(index_type=index_type))
    seconds = time.perf_counter() - started
    grown = memory_mib()[0] - before
    index.save(folder / f"faiss-{index_type}")
    return index, seconds, grown, directory_mib(folder / f"faiss-{index_type}")


def tree_rss_mib(pid: int) -> float:
    """Resident memory of process ``pid`` and all its descendants, MiB (from /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(stat[1])
            rss[int(entry.name)] = int(stat[21]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    tree, grew = {pid}, True
    while grew:
        children = {child for child, parent in parents.items() if parent in tree} - tree
        tree |= children
        grew = bool(children)
    return sum(rss.get(member, 0.0) for member in tree)


@contextlib.contextmanager
def milvus_server(folder: Path) -> Iterator[tuple[int, int]]:
    """A standalone Milvus server (``milvus-server``, the ``milvus`` package) on a free loopback
    port with its data in ``folder``: yields (port, pid of its process tree); stopped on exit."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [str(Path(sys.executable).parent / "milvus-server"), "--data", str(folder)]
    log = (folder.parent / "milvus-server.log").open("w")
    process = subprocess.Popen([*command, "--proxy-port", str(port)], stdout=log, stderr=subprocess.STDOUT)
    try:
        from pymilvus import MilvusClient

        deadline = time.monotonic() + 300
        while True:
            try:
                MilvusClient(uri=f"http://127.0.0.1:{port}", timeout=5).close()
                break
            except Exception:  # not up yet: the server takes 10-40 s to start
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Milvus server did not start; see {log.name}") from None
                time.sleep(1)
        yield port, process.pid
    finally:
        process.send_signal(signal.SIGINT)  # milvus-server stops its server on SIGINT
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def build_milvus(
    docs: np.ndarray, doc_ids: list[str], index_type: str, folder: Path, server: tuple | None = None
) -> tuple:
    """(store, build seconds, memory growth MiB, disk MiB): upserts as `sbmoe index --store`, then load.

    ``server``: (port, pid, data folder) of a running server; ``None``: Milvus Lite in this process.
    """
    if server is None:
        uri = parse_store_uri(f"milvus:{folder / f'milvus-{index_type}.db'}?collection=bench")
        memory, disk = (lambda: memory_mib()[0]), (lambda: directory_mib(Path(uri.path)))
    else:
        port, pid, data = server
        uri = parse_store_uri(f"milvus://127.0.0.1:{port}?collection=bench_{index_type}&timeout=600")
        memory, disk = (lambda: tree_rss_mib(pid)), (lambda: directory_mib(data))
    before, disk_before = memory(), disk() if server else 0.0
    started = time.perf_counter()
    meta = store_meta("bench", docs.shape[1], len(docs), IndexConfig(index_type=index_type), 0, {})
    store = MilvusStore.create_or_resume(uri, meta, overwrite=True)
    for start in range(0, len(docs), INDEX_CHUNK_SIZE):
        store.upsert(doc_ids[start : start + INDEX_CHUNK_SIZE], docs[start : start + INDEX_CHUNK_SIZE])
    # As `sbmoe index --store` then `sbmoe search` do: finish (a server seals the rows and builds
    # its index), close the writer, open the store for searching (Milvus Lite builds each sealed
    # segment's index when it loads the collection).
    store.finish()
    store.close()
    store = MilvusStore.open(uri, "bench")
    store.search(docs[:1], K)
    seconds = time.perf_counter() - started
    if server is not None:
        settle(store)
    return store, seconds, memory() - before, disk() - disk_before


def settle(store: MilvusStore) -> None:
    """Wait until the server has indexed every segment it made by merging others after the write
    job ended (searches timed meanwhile would share the cores with those index builds)."""
    started = time.perf_counter()
    while int(store._client.describe_index(store.uri.collection, VECTOR_FIELD).get("pending_index_rows", 0)):
        time.sleep(5)
    seconds = time.perf_counter() - started
    print(f"  the server went on indexing merged segments for {seconds:.0f} s", flush=True)


def data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The documents and queries: unit vectors around ``args.centers`` random centres, seeded."""
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.centers, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return vectors(rng, args.size, args.dim, centers), vectors(rng, args.queries, args.dim, centers)


def measure(case: tuple[str, str], args: argparse.Namespace, server: tuple | None, results) -> None:
    """Build one (engine, index type) in a fresh folder, search it, and put the figures on ``results``."""
    engine, index_type = case
    docs, queries = data(args)
    doc_ids = [f"d{i}" for i in range(len(docs))]
    query_ids = [f"q{i}" for i in range(len(queries))]
    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        if engine == "FAISS":
            index, seconds, grown, disk = build_faiss(docs, doc_ids, index_type, folder)
        else:
            index, seconds, grown, disk = build_milvus(
                docs, doc_ids, index_type, folder, server if engine == "Milvus server" else None
            )
        del docs
        run, batched = timed(index.search, queries, query_ids, 1024)
        _, one_by_one = timed(index.search, queries[: args.single], query_ids[: args.single], 1)
        if isinstance(index, MilvusStore):
            if server is not None and engine == "Milvus server":  # free the server's memory
                index._client.drop_collection(index.uri.collection)
            index.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results.put((seconds, grown, disk, run, batched, one_by_one))


def installed(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--centers", type=int, default=10_000, help="clusters of the vectors")
    parser.add_argument("--index-types", nargs="+", default=["flat", "hnsw"], choices=("flat", "hnsw", "ivf"))
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument(
        "--skip", nargs="*", default=[], metavar="ENGINE:TYPE", help='cases left out, e.g. "FAISS:hnsw"'
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {machine()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    packages = ("pymilvus", "milvus-lite", "milvus")
    print(", ".join(f"{name} {installed(name)}" for name in packages), "(milvus: the server)")
    raw = args.size * args.dim * 4 / 2**20
    print(
        f"settings: {args.size:,} clustered unit vectors of dimension {args.dim} ({args.centers:,} centres), "
        f"{args.queries} queries, top {K}, inner product; raw vectors {raw:,.0f} MiB"
    )
    context = multiprocessing.get_context("spawn")
    rows, exact_run = [], None
    cases = [("FAISS", "flat")] + [
        (e, t) for t in args.index_types for e in args.engines if f"{e}:{t}" not in args.skip
    ]
    with contextlib.ExitStack() as stack:
        server = None
        if "Milvus server" in args.engines:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-server-")))
            port, pid = stack.enter_context(milvus_server(folder / "data"))
            server = (port, pid, folder / "data")
            print(f"Milvus server on port {port}: {tree_rss_mib(pid):,.0f} MiB resident after start")
        for case in dict.fromkeys(cases):  # FAISS flat first: the exact reference
            results = context.Queue()
            process = context.Process(target=measure, args=(case, args, server, results))
            process.start()
            seconds, grown, disk, run, batched, single = results.get()
            process.join()
            exact_run = exact_run or run
            rows.append(row((*case, seconds, grown, disk, recall_at_k(run, exact_run), batched, single)))
            print(f"  done: {rows[-1]}", flush=True)
    print()
    print("| engine | index | build s | RSS growth MiB | disk MiB | recall@10 | batched q/s | single q/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))


def row(figures: tuple) -> str:
    """One table row: engine, index, build s, memory MiB, disk MiB, recall@10, batched and single q/s."""
    engine, index_type, seconds, grown, disk, recall, batched, single = figures
    return (
        f"| {engine} | {index_type} | {seconds:,.1f} | {grown:,.0f} | {disk:,.0f} | {recall:.3f} | "
        f"{batched:,.0f} | {single:,.1f} |"
    )


if __name__ == "__main__":
    main()
