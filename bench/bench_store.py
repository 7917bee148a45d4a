"""A vector store (Milvus Lite, embedded) against FAISS on the same clustered vectors, side by side.

Loads ``--size`` unit vectors (drawn around random centres, as in ``bench_ann.py``) into FAISS
(``DenseIndex``, as ``sbmoe index`` builds it) and into Milvus Lite (``MilvusStore``, as ``sbmoe index
--store`` writes it: upserts of 4,096 documents by id), each as an exact (flat) and an HNSW index
(M 32, efSearch 128) or, with ``--index-types``, an IVF index (the same nlist and nprobe on both
sides, sbmoe's defaults for the corpus size), and prints one table: build time, memory, disk,
recall@10 against exact search, queries/s with all queries in batches of 1,024 and one query at a time.

Each index is built and searched in a fresh process of its own (which draws the same vectors from
the same seed), so "memory" is that process's resident memory growth while it builds and loads the
index (Milvus Lite runs inside it: a gRPC
server on loopback, the engine in Python over FAISS).

    .venv/bin/python bench/bench_store.py [--size 1000000] [--dim 384] [--queries 1000] [--single 50]
        [--index-types flat hnsw ivf]
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import faiss
import numpy as np
from bench_ann import memory_mib, recall_at_k, vectors
from common import machine

from sbmoe.config.jobs import IndexConfig
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.indexing import INDEX_CHUNK_SIZE
from sbmoe.retrieval.milvus.collection import store_meta
from sbmoe.retrieval.milvus.store import MilvusStore
from sbmoe.retrieval.milvus.uri import parse_store_uri

K = 10


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


def build_milvus(docs: np.ndarray, doc_ids: list[str], index_type: str, folder: Path) -> tuple:
    """(store, build seconds, memory growth MiB, disk MiB): upserts as `sbmoe index --store`, then load."""
    uri = parse_store_uri(f"milvus:{folder / f'milvus-{index_type}.db'}?collection=bench")
    before, _ = memory_mib()
    started = time.perf_counter()
    meta = store_meta("bench", docs.shape[1], len(docs), IndexConfig(index_type=index_type), 0, {})
    store = MilvusStore.create_or_resume(uri, meta)
    for start in range(0, len(docs), INDEX_CHUNK_SIZE):
        store.upsert(doc_ids[start : start + INDEX_CHUNK_SIZE], docs[start : start + INDEX_CHUNK_SIZE])
    # As `sbmoe index --store` then `sbmoe search` do: close the writer, open the store for
    # searching (Milvus Lite builds each sealed segment's index when it loads the collection).
    store.close()
    store = MilvusStore.open(uri, "bench")
    store.search(docs[:1], K)
    seconds = time.perf_counter() - started
    grown = memory_mib()[0] - before
    return store, seconds, grown, directory_mib(Path(uri.path))


def data(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """The documents and queries: unit vectors around ``args.centers`` random centres, seeded."""
    rng = np.random.default_rng(args.seed)
    centers = rng.standard_normal((args.centers, args.dim), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    return vectors(rng, args.size, args.dim, centers), vectors(rng, args.queries, args.dim, centers)


def measure(case: tuple[str, str], args: argparse.Namespace, results) -> None:
    """Build one (engine, index type) in a fresh folder, search it, and put the figures on ``results``."""
    engine, index_type = case
    docs, queries = data(args)
    build = build_faiss if engine == "FAISS" else build_milvus
    doc_ids = [f"d{i}" for i in range(len(docs))]
    query_ids = [f"q{i}" for i in range(len(queries))]
    folder = Path(tempfile.mkdtemp(prefix="bench-store-"))
    try:
        index, seconds, grown, disk = build(docs, doc_ids, index_type, folder)
        run, batched = timed(index.search, queries, query_ids, 1024)
        _, one_by_one = timed(index.search, queries[: args.single], query_ids[: args.single], 1)
        if isinstance(index, MilvusStore):
            index.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    results.put((seconds, grown, disk, run, batched, one_by_one))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--centers", type=int, default=10_000, help="clusters of the vectors")
    parser.add_argument("--index-types", nargs="+", default=["flat", "hnsw"], choices=("flat", "hnsw", "ivf"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {machine()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    print(f"pymilvus {version('pymilvus')}, milvus-lite {version('milvus-lite')}")
    raw = args.size * args.dim * 4 / 2**20
    print(
        f"settings: {args.size:,} clustered unit vectors of dimension {args.dim} ({args.centers:,} centres), "
        f"{args.queries} queries, top {K}, inner product; raw vectors {raw:,.0f} MiB"
    )
    context = multiprocessing.get_context("spawn")
    rows, exact_run = [], None
    cases = [("FAISS", "flat")] + [(e, t) for t in args.index_types for e in ("FAISS", "Milvus Lite")]
    for case in dict.fromkeys(cases):  # FAISS flat first: the exact reference
        results = context.Queue()
        process = context.Process(target=measure, args=(case, args, results))
        process.start()
        seconds, grown, disk, run, batched, single = results.get()
        process.join()
        exact_run = exact_run or run
        rows.append((*case, seconds, grown, disk, recall_at_k(run, exact_run), batched, single))
        print(f"  done: {case[0]} {case[1]} ({seconds:.0f} s build)", flush=True)
    print()
    print("| engine | index | build s | RSS growth MiB | disk MiB | recall@10 | batched q/s | single q/s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for engine, index_type, seconds, grown, disk, recall, batched, single in rows:
        print(
            f"| {engine} | {index_type} | {seconds:,.1f} | {grown:,.0f} | {disk:,.0f} | {recall:.3f} | "
            f"{batched:,.0f} | {single:,.1f} |"
        )


if __name__ == "__main__":
    main()
