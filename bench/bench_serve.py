"""Serving: latency and throughput of `sbmoe serve` over loopback against in-process search, same run.

all-MiniLM-L6-v2 saved with 128-token documents, the SciFact corpus indexed once (encodings come
from the embedding cache after the first run), then the SciFact test queries sent:

* one at a time from one client: the library's ``search()`` called in-process (the reference),
  the same service in-process without HTTP, and ``POST /search`` (the ratio is the HTTP cost);
* in batches of ``--batch`` queries per call, the same three ways;
* one query per request from ``--clients`` threads at once (micro-batched by the service, except
  under int8, where it takes one request at a time);
* the one-shot ``sbmoe search`` command per query (model and index loaded every time).

Prints the CPU class, p50/p95/p99 latency and queries/s, and how often the served top 10 equals
the in-process one. Bounded: at most ``--queries`` queries per phase and ``--cold-starts`` commands.

    .venv/bin/python bench/bench_serve.py [--queries 300] [--batch 32] [--clients 8] [--cold-starts 3]
        [--backend auto] [--precision auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
from common import machine, scifact

from sbmoe.config.jobs import EncodeConfig, JobOptions, SearchConfig, ServeConfig
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.indexing import index_corpus
from sbmoe.retrieval.search import search
from sbmoe.serve.http import BackgroundServer, create_app
from sbmoe.serve.service import SearchService

MODEL = "all-MiniLM-L6-v2"
DOC_TOKENS = 128
TOP_K = 10
SEARCH = SearchConfig(top_k=TOP_K)
Search = Callable[[Sequence[str]], list[list[str]]]


class Client:
    """One keep-alive HTTP connection (as a real client keeps it)."""

    def __init__(self, url: str) -> None:
        parsed = urlparse(url)
        self.connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)

    def __call__(self, queries: Sequence[str]) -> list[list[str]]:
        body = json.dumps({"queries": list(queries), "top_k": TOP_K})
        self.connection.request("POST", "/search", body, {"Content-Type": "application/json"})
        answer = self.connection.getresponse()
        payload = json.loads(answer.read())
        if answer.status != 200:
            raise RuntimeError(f"/search answered {answer.status}: {payload}")
        return [[hit["id"] for hit in result["hits"]] for result in payload["results"]]


def library(service: SearchService) -> Search:
    """The library's ``search()`` in this process, on the service's model and index."""

    def run(queries: Sequence[str]) -> list[list[str]]:
        ids = [str(n) for n in range(len(queries))]
        queried = dict(zip(ids, queries, strict=True))
        found = search(service.retriever, service.index, queried, SEARCH, service.encode_config)
        return [list(found[query_id]) for query_id in ids]

    return run


def in_process(service: SearchService) -> Search:
    """The service in this process, without HTTP."""
    return lambda queries: [[doc for doc, _ in result.hits] for result in service.search(queries).result()]


def interleaved(ways: dict[str, Search], groups: Sequence[list[str]]) -> dict[str, tuple[list[float], list]]:
    """Send each group every way in turn, the order rotating, so that load on the machine hits all
    ways alike: per way, seconds per call and the rankings in query order."""
    measured: dict[str, tuple[list[float], list]] = {name: ([], []) for name in ways}
    names = list(ways)
    for n, group in enumerate(groups):
        for name in names[n % len(names) :] + names[: n % len(names)]:
            begun = time.perf_counter()
            rankings = ways[name](group)
            measured[name][0].append(time.perf_counter() - begun)
            measured[name][1].extend(rankings)
    return measured


def concurrent(url: str, texts: list[str], clients: int) -> tuple[list[float], list[list[str]], float]:
    """One query per request from ``clients`` threads at once, each on its own connection."""
    local = threading.local()

    def one(text: str) -> tuple[float, list[str]]:
        if not hasattr(local, "client"):
            local.client = Client(url)
        begun = time.perf_counter()
        (ranking,) = local.client([text])
        return time.perf_counter() - begun, ranking

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one, texts))
    return [a[0] for a in answers], [a[1] for a in answers], time.perf_counter() - started


def cold_starts(model_dir: Path, index_dir: Path, texts: list[str], encode: EncodeConfig) -> list[float]:
    """Seconds of one ``sbmoe search --query`` command per text (model and index loaded each time)."""
    seconds = []
    for text in texts:
        command = ["search", "--model", str(model_dir), "--index", str(index_dir), "--query", text]
        command += ["--backend", encode.backend, "--precision", encode.precision]
        begun = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sbmoe.cli", "-q", *command], check=True, capture_output=True)
        seconds.append(time.perf_counter() - begun)
    return seconds


def row(name: str, latencies: Sequence[float], queries: int, total: float, reference: float) -> str:
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    rate = queries / total
    return f"| {name} | {p50:.1f} | {p95:.1f} | {p99:.1f} | {rate:.1f} | {rate / reference:.2f}x |"


def same_top(rankings: list[list[str]], reference: list[list[str]]) -> str:
    return f"{sum(a == b for a, b in zip(rankings, reference, strict=True))}/{len(reference)}"


def prepare(workdir: Path) -> tuple[Path, Path]:
    """MiniLM saved with 128-token documents, and its index of the SciFact corpus."""
    model_dir, index_dir = workdir / "model", workdir / "index"
    if not (index_dir / "meta.json").exists():
        retriever = Retriever.load(MODEL)
        retriever.config = dataclasses.replace(retriever.config, max_doc_length=DOC_TOKENS)
        retriever.save(model_dir)
        started = time.perf_counter()
        index_corpus(
            retriever, scifact(), index_dir, options=JobOptions(cache=EmbeddingCache(), show_progress=False)
        )
        print(f"indexed the SciFact corpus in {time.perf_counter() - started:.0f} s (cached on later runs)")
    return model_dir, index_dir


def one_by_one_and_batched(
    service: SearchService, url: str, texts: list[str], batch: int
) -> tuple[list[str], list[str], float, list[list[str]]]:
    """Table rows and notes of the sequential phases; the single-query library rate and rankings."""
    rows, notes = [], []
    ways = {
        "library `search()`": library(service),
        "service in-process": in_process(service),
        "HTTP": Client(url),
    }
    single = [[text] for text in texts]
    batched = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    for label, groups in (("single", single), (f"batches of {batch}", batched)):
        measured = interleaved(ways, groups)
        rates = {name: len(texts) / sum(latencies) for name, (latencies, _) in measured.items()}
        reference_rate, reference = rates["library `search()`"], measured["library `search()`"][1]
        if label == "single":
            single_rate, single_reference = reference_rate, reference
        for name, (latencies, rankings) in measured.items():
            rows.append(row(f"{label}: {name}", latencies, len(texts), sum(latencies), reference_rate))
            if rankings is not reference:
                notes.append(
                    f"{label}, {name}: same top {TOP_K} as the library {same_top(rankings, reference)}"
                )
        overhead = rates["service in-process"] / rates["HTTP"]
        notes.append(f"{label}: HTTP takes {overhead:.2f}x the in-process service's time")
    return rows, notes, single_rate, single_reference


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=300, help="test queries per phase (at most)")
    parser.add_argument("--batch", type=int, default=32, help="queries per batched call")
    parser.add_argument("--clients", type=int, default=8, help="threads sending at once")
    parser.add_argument("--cold-starts", type=int, default=3, help="one-shot `sbmoe search` commands")
    parser.add_argument("--backend", default="auto", help="encoding backend (default: auto)")
    parser.add_argument("--precision", default="auto", help="encoding precision (default: auto)")
    parser.add_argument("--workdir", help="keep the saved model and index here (default: a temporary folder)")
    args = parser.parse_args()

    collection = scifact()
    texts = [collection.queries[q] for q in sorted(collection.split_qrels("test"))][: args.queries]
    table = [
        "| how | p50 ms | p95 ms | p99 ms | queries/s | vs library in-process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, index_dir = prepare(Path(args.workdir or scratch))
        encode = EncodeConfig(backend=args.backend, precision=args.precision)
        service = SearchService(Retriever.load(str(model_dir)), index_dir, SEARCH, encode)
        info = service.info()
        print(f"machine: {machine()}")
        print(
            f"{len(texts)} SciFact test queries x {info['index']['size']} documents ({MODEL}, "
            f"{DOC_TOKENS}-token documents, flat index), top {TOP_K}, loopback HTTP; encoding: "
            f"{info['encoding']['backend']} {info['encoding']['precision']}"
        )
        with BackgroundServer(create_app(service, ServeConfig(max_texts=max(args.batch, 256)))) as server:
            rows, notes, single_rate, reference = one_by_one_and_batched(
                service, server.url, texts, args.batch
            )
            table += rows
            batches_before = service.stats["batches"]
            latencies, rankings, total = concurrent(server.url, texts, args.clients)
        name = f"{args.clients} clients at once, single: HTTP"
        table.append(row(name, latencies, len(texts), total, single_rate))
        notes.append(
            f"{args.clients} clients: {len(texts)} requests in {service.stats['batches'] - batches_before} "
            f"micro-batches; same top {TOP_K} as the library {same_top(rankings, reference)}"
        )
        cold = cold_starts(model_dir, index_dir, texts[: args.cold_starts], encode)
        table.append(
            row("one-shot `sbmoe search` command per query", cold, len(cold), sum(cold), single_rate)
        )
    print("\n".join(table))
    print("\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
