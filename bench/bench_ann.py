"""Approximate search at scale: an IVF (or HNSW) DenseIndex over 1M random 384-d vectors vs exact search.

Reports build time, memory, queries per second and recall@10 against the exact (flat) index, for a
sweep of the search setting (IVF ``nprobe`` / HNSW ``efSearch``), the default marked. Queries per
second are measured two ways: all queries in one batch (offline evaluation: exact search is then
one BLAS matrix product per corpus block, hard to beat) and one query at a time (online search,
where exact search reads the whole corpus per query). The vectors
are unit vectors drawn around random centres (``clustered``, the structure real embeddings have)
or straight from a Gaussian (``gaussian``: no structure, the hardest case for any ANN index).
Everything goes through ``sbmoe.retrieval.faiss.index.DenseIndex``, as ``sbmoe index --index-type ivf`` does.

    .venv/bin/python bench/bench_ann.py [--n 1000000] [--dim 384] [--queries 1000]
        [--index-type ivf|hnsw] [--distribution clustered|gaussian] [--nlist N]
"""

from __future__ import annotations

import argparse
import time

import faiss
import numpy as np
from common import machine

from sbmoe.config.jobs import IndexConfig
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.faiss.index_types import default_nlist, default_nprobe

K = 10


def memory_mib() -> tuple[float, float]:
    """(current, peak) resident memory of this process, MiB."""
    with open("/proc/self/status", encoding="utf-8") as handle:
        fields = dict(line.split(":", 1) for line in handle if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def vectors(rng: np.random.Generator, n: int, dim: int, centers: np.ndarray | None) -> np.ndarray:
    """``n`` unit vectors, made in chunks to keep the float32 peak small."""
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        noise = rng.standard_normal((stop - start, dim), dtype=np.float32)
        if centers is not None:
            noise = centers[rng.integers(0, len(centers), stop - start)] + noise / np.sqrt(dim)
        out[start:stop] = noise / np.linalg.norm(noise, axis=1, keepdims=True)
    return out


def recall_at_k(run: dict, exact: dict) -> float:
    return float(np.mean([len(set(run[q]) & set(exact[q])) / K for q in exact]))


def timed_search(
    index: DenseIndex, queries: np.ndarray, query_ids: list[str], batch_size: int = 1024
) -> tuple[dict, float]:
    started = time.perf_counter()
    run = index.search(queries, K, query_ids=query_ids, batch_size=batch_size)
    return run, len(queries) / (time.perf_counter() - started)


def both_ways(index: DenseIndex, queries: np.ndarray, query_ids: list[str], single: int) -> tuple:
    """(run, batched queries/s, one-at-a-time queries/s over the first ``single`` queries)."""
    run, batched = timed_search(index, queries, query_ids)
    _, one_by_one = timed_search(index, queries[:single], query_ids[:single], batch_size=1)
    return run, batched, one_by_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="indexed vectors")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--index-type", choices=("ivf", "hnsw"), default="ivf")
    parser.add_argument("--distribution", choices=("clustered", "gaussian"), default="clustered")
    parser.add_argument("--centers", type=int, default=10_000, help="clusters of the clustered vectors")
    parser.add_argument("--nlist", type=int, help="IVF cells (default: sbmoe's, about 2 sqrt(n))")
    parser.add_argument("--single", type=int, default=50, help="queries timed one at a time")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"machine: {machine()}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads")
    rng = np.random.default_rng(args.seed)
    centers = None
    if args.distribution == "clustered":
        centers = rng.standard_normal((args.centers, args.dim), dtype=np.float32)
        centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    print(
        f"settings: {args.n:,} {args.distribution} unit vectors of dimension {args.dim}"
        + (f" ({args.centers:,} centres, noise norm ~1)" if centers is not None else "")
        + f", {args.queries} queries from the same distribution, top {K}, inner product"
    )

    started = time.perf_counter()
    docs = vectors(rng, args.n, args.dim, centers)
    queries = vectors(rng, args.queries, args.dim, centers)
    doc_ids = [f"d{i}" for i in range(args.n)]
    query_ids = [f"q{i}" for i in range(args.queries)]
    print(f"data: {time.perf_counter() - started:.1f} s")

    started = time.perf_counter()
    exact = DenseIndex(docs, doc_ids, "bench")
    del docs  # the flat index holds its own copy; the ANN index is built from it
    exact_build = time.perf_counter() - started
    exact_run, exact_qps, exact_single = both_ways(exact, queries, query_ids, args.single)
    print(
        f"flat (exact): build {exact_build:.1f} s, vectors {args.n * args.dim * 4 / 2**20:,.0f} MiB, "
        f"{exact_qps:,.0f} queries/s batched, {exact_single:,.1f} queries/s one at a time"
    )

    before, _ = memory_mib()
    started = time.perf_counter()
    if args.index_type == "ivf":
        nlist = args.nlist or default_nlist(args.n)
        index = DenseIndex(exact.vectors(), doc_ids, "bench", IndexConfig(index_type="ivf", nlist=nlist))
    else:
        index = DenseIndex(exact.vectors(), doc_ids, "bench", IndexConfig(index_type="hnsw"))
    build = time.perf_counter() - started
    after, peak = memory_mib()
    if args.index_type == "ivf":
        invlists = index._index.invlists
        held = args.n * (invlists.code_size + 8) + nlist * args.dim * 4  # vectors + ids + centroids
        described = f"IVF-Flat, nlist {nlist} (trained on {min(args.n, 64 * nlist):,} vectors)"
    else:
        held = args.n * args.dim * 4 + args.n * 2 * 32 * 4  # vectors + about 2M links of 4 bytes per node
        described = "HNSW-Flat, M 32"
    print(
        f"{described}: build {build:.1f} s; memory: index ~{held / 2**20:,.0f} MiB, process grew "
        f"{after - before:,.0f} MiB (peak resident {peak:,.0f} MiB)"
    )

    setting = "nprobe" if args.index_type == "ivf" else "efSearch"
    print(f"{setting:>9}  {'batched q/s':>11}  {'single q/s':>10}  {'recall@10':>9}")

    def row(value: int, default: int) -> None:
        run, batched, single = both_ways(index, queries, query_ids, args.single)
        mark = "  <- default" if value == default else ""
        print(f"{value:>9}  {batched:>11,.0f}  {single:>10,.1f}  {recall_at_k(run, exact_run):>9.3f}{mark}")

    if args.index_type == "ivf":
        default = default_nprobe(nlist)
        for nprobe in sorted({max(1, default // 4), max(1, default // 2), default, 2 * default, 4 * default}):
            index.nprobe = nprobe
            row(nprobe, default)
    else:
        import sbmoe.retrieval.faiss.index

        default = sbmoe.retrieval.faiss.index._HNSW_EF_SEARCH
        for ef in (32, 64, 128, 256):
            sbmoe.retrieval.faiss.index._HNSW_EF_SEARCH = ef
            row(ef, default)
        sbmoe.retrieval.faiss.index._HNSW_EF_SEARCH = default
    print(f"{'exact':>9}  {exact_qps:>11,.0f}  {exact_single:>10,.1f}  {1:>9.3f}")


if __name__ == "__main__":
    main()
