"""Serving: one query through `sbmoe serve` against the time of one forward pass, stage by stage.

all-MiniLM-L6-v2 saved with 128-token documents, the SciFact corpus indexed once (flat, exact;
encodings come from the embedding cache after the first run), then the SciFact test queries sent
one at a time, every way in turn for each query (so that load on the machine hits all ways alike):

* sentence-transformers' own ``encode`` of the one query (the floor: one forward pass);
* the stages of a served query as a worker runs them (its numerics, its share of the threads):
  tokenisation, the backbone, the head, ``DenseIndex.search``, sbmoe's single-text encoder;
* the library's ``search()``, the service in-process and ``POST /search`` over loopback HTTP
  (keep-alive): p50/p95/p99, and served p50 / floor;
* the HTTP floor in a phase of its own (nothing else running): ``GET /health`` against the same
  ``requests`` GET of a server that does nothing (the client's own cost), alternating;
* then batches of ``--batch`` queries per call; throughput: one client sending the queries one by one
  against ``--clients`` threads sending them at once, alternating, ``--repeats`` times (median and
  spread of the ratio); and the one-shot ``sbmoe search`` command per query.

Prints the CPU (model name and flags) first, and how often the served top 10 equals the library's.

    .venv/bin/python bench/bench_serve.py [--queries 300] [--batch 32] [--clients 8] [--repeats 3]
        [--cold-starts 3] [--backend auto] [--precision auto] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import multiprocessing
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
import torch
from common import machine, scifact

from sbmoe.config.jobs import EncodeConfig, JobOptions, SearchConfig
from sbmoe.core.runtime import autocast
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import TextEncoder, encoder_runner, run_stages, tokenize
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import open_index
from sbmoe.retrieval.indexing import index_corpus
from sbmoe.retrieval.search import search
from sbmoe.serving.service import SearchService

MODEL = "all-MiniLM-L6-v2"
FLOOR = "sentence-transformers `encode` (floor)"
SERVICE = "service in-process"
HTTP = "HTTP `POST /search`"
HEALTH = "HTTP `GET /health` (the HTTP floor)"
NOTHING = "`requests` GET of a server that does nothing (the client's own cost)"
# What that server answers to every request: the bytes of a /health answer, no parsing, no framework.
FIXED_ANSWER = (
    b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 15\r\n\r\n{"status":"ok"}'
)
INDEX = "`DenseIndex.search` of one vector"
ENCODE = "sbmoe encode of one text (as a worker: its numerics and threads)"
DOC_TOKENS = 128
TOP_K = 10
SEARCH = SearchConfig(top_k=TOP_K)
Search = Callable[[Sequence[str]], list[list[str]]]


class Client:
    """One keep-alive HTTP connection through ``requests``, as a real client keeps it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.session = requests.Session()

    def __call__(self, queries: Sequence[str]) -> list[list[str]]:
        payload = json.loads(self.post(queries))
        return [[hit["id"] for hit in result["hits"]] for result in payload["results"]]

    def post(self, queries: Sequence[str]) -> bytes:
        """The body of ``POST /search`` for ``queries``, as sent."""
        answer = self.session.post(f"{self.url}/search", json={"queries": list(queries), "top_k": TOP_K})
        if answer.status_code != 200:
            raise RuntimeError(f"/search answered {answer.status_code}: {answer.text}")
        return answer.content

    def health(self, _: Sequence[str]) -> list:
        """``GET /health``: the HTTP floor (no work behind it)."""
        answer = self.session.get(f"{self.url}/health")
        if answer.status_code != 200:
            raise RuntimeError(f"/health answered {answer.status_code}: {answer.text}")
        return []


@contextlib.contextmanager
def served(model_dir: Path, index_dir: Path, encode: EncodeConfig) -> Iterator[str]:
    """``sbmoe serve`` in a process of its own (as deployed: clients never share its interpreter);
    its URL inside the block."""
    command = [sys.executable, "-m", "sbmoe.cli", "-q", "serve", "--model", str(model_dir)]
    command += ["--index", str(index_dir), "--port", "0", "--max-texts", "256"]
    command += ["--backend", encode.backend, "--precision", encode.precision]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        if not line.startswith("listening on "):
            raise RuntimeError(f"sbmoe serve did not start: {line!r}")
        yield line.split()[-1]
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(timeout=120)


def _answer_forever(listening: socket.socket) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                await reader.readuntil(b"\r\n\r\n")
                writer.write(FIXED_ANSWER)
                await writer.drain()

    async def run() -> None:
        server = await asyncio.start_server(answer, sock=listening)
        await server.serve_forever()

    asyncio.run(run())


@contextlib.contextmanager
def do_nothing_server() -> Iterator[str]:
    """A server in a process of its own that answers every request at once with fixed bytes: what
    a `requests` call costs the client alone; its URL inside the block."""
    listening = socket.create_server(("127.0.0.1", 0))
    process = multiprocessing.get_context("fork").Process(
        target=_answer_forever, args=(listening,), daemon=True
    )
    process.start()
    try:
        yield f"http://127.0.0.1:{listening.getsockname()[1]}"
    finally:
        process.terminate()
        process.join()
        listening.close()


def library(service: SearchService, encode: EncodeConfig | None = None) -> Search:
    """The library's ``search()`` in this process, on the service's model and index, encoding as
    ``encode`` says (default: the service's configuration, which ``auto`` resolves for batches)."""

    def run(queries: Sequence[str]) -> list[list[str]]:
        ids = [str(n) for n in range(len(queries))]
        queried = dict(zip(ids, queries, strict=True))
        found = search(service.retriever, service.index, queried, SEARCH, encode or service.encode_config)
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


def concurrent(url: str, texts: list[str], clients: int) -> tuple[list[float], list[bytes], float]:
    """One query per request from ``clients`` threads at once, each on its own connection: the
    latencies, the bodies in ``texts``' order, and the seconds in all."""
    local = threading.local()

    def one(text: str) -> tuple[float, bytes]:
        if not hasattr(local, "client"):
            local.client = Client(url)
        begun = time.perf_counter()
        body = local.client.post([text])
        return time.perf_counter() - begun, body

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


@contextlib.contextmanager
def on_threads(threads: int) -> Iterator[None]:
    """torch's passes in this thread on ``threads`` threads inside the block (as a worker's are)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stage_ways(service: SearchService, texts: list[str]) -> dict[str, Search]:
    """The floor (on torch's own threads) and each stage of a served query as a worker runs it (its
    numerics, its share of the threads), timed on their own (they return no ranking)."""
    retriever, threads = service.retriever, service.threads_per_worker
    encoder = TextEncoder(retriever, service.encode_config, threads=threads)
    precision = encoder.plan.precision
    same_numerics = dataclasses.replace(
        service.encode_config, backend=encoder.plan.backend, precision=precision
    )
    runner = encoder_runner(retriever, same_numerics, threads=threads)
    batches = {text: tokenize(retriever, [text], "query") for text in texts}
    encoded = {text: encoder(text, "query") for text in texts}
    heads = retriever.head_stages()

    def floor(group: Sequence[str]) -> list:
        retriever.model.encode(list(group), batch_size=1, show_progress_bar=False)
        return []

    def backbone(group: Sequence[str]) -> list:
        with torch.inference_mode(), autocast(precision, retriever.device):
            runner(dict(batches[group[0]]))
        return []

    def head(group: Sequence[str]) -> list:
        with torch.inference_mode():
            run_stages(heads, {"sentence_embedding": torch.from_numpy(encoded[group[0]].pooled)})
        return []

    def timed_only(stage: Callable[[str], object]) -> Search:
        def run(group: Sequence[str]) -> list:
            stage(group[0])
            return []  # not a ranking

        return run

    def as_a_worker(way: Search) -> Search:
        def run(group: Sequence[str]) -> list:
            with on_threads(threads):
                return way(group)

        return run

    stages = {
        "tokenise": timed_only(lambda text: tokenize(retriever, [text], "query")),
        "backbone (tokens to pooled)": backbone,
        "head (float32)": head,
        INDEX: timed_only(lambda text: service.index.search(encoded[text].embedding, TOP_K, query_ids=["q"])),
        ENCODE: timed_only(lambda text: encoder(text, "query")),
    }
    return {FLOOR: floor, **{name: as_a_worker(way) for name, way in stages.items()}}


def single_queries(
    service: SearchService, url: str, texts: list[str]
) -> tuple[list[str], list[str], dict, list[list[str]]]:
    """Table rows and notes of one query at a time, every way interleaved; the measurements; the
    library's rankings at the service's numerics."""
    ways = {"library `search()`": library(service), SERVICE: in_process(service), HTTP: Client(url)}
    measured = interleaved({**stage_ways(service, texts), **ways}, [[t] for t in texts])
    p50 = {name: float(np.percentile(latencies, 50)) for name, (latencies, _) in measured.items()}
    rows = [latency_row(name, latencies, p50[FLOOR]) for name, (latencies, _) in measured.items()]
    # The service encodes each query alone, under its own numerics (``auto`` picks them for one
    # text): the library's batches at the same backend and precision rank as it must.
    plan = service.info()["encoding"]
    same_numerics = dataclasses.replace(
        service.encode_config, backend=plan["backend"], precision=plan["precision"]
    )
    reference = library(service, same_numerics)(texts)
    notes = [
        f"served p50 over HTTP / floor p50 = {p50[HTTP] / p50[FLOOR]:.2f}x "
        f"({p50[HTTP] * 1000:.1f} ms / {p50[FLOOR] * 1000:.1f} ms)",
        f"in the service outside encoding and search (queue, hand-off to the worker, the result): "
        f"{median_gap(measured, SERVICE, ENCODE, INDEX):.2f} ms; HTTP, validation and JSON: "
        f"{median_gap(measured, HTTP, SERVICE):.2f} ms (medians of the per-query differences)",
    ]
    for name in (SERVICE, HTTP):
        notes.append(
            f"single, {name}: same top {TOP_K} as the library at the service's numerics "
            f"({plan['backend']} {plan['precision']}) {same_top(measured[name][1], reference)}, at its "
            f"own ({service.encode_config.backend} {service.encode_config.precision}: batches) "
            f"{same_top(measured[name][1], measured['library `search()`'][1])}"
        )
    return rows, notes, measured, reference


def http_floor(url: str, requests_sent: int, floor: float) -> tuple[list[str], str]:
    """Table rows (p50 against ``floor`` seconds) and a note of ``GET /health`` against the same GET of
    a server that does nothing, alternating, in a phase of their own (no encoding meanwhile)."""
    with do_nothing_server() as nothing:
        ways = {HEALTH: Client(url).health, NOTHING: Client(nothing).health}
        measured = interleaved(ways, [[]] * requests_sent)
    p50 = {name: float(np.percentile(latencies, 50)) for name, (latencies, _) in measured.items()}
    rows = [latency_row(name, latencies, floor) for name, (latencies, _) in measured.items()]
    note = (
        f"`GET /health` p50 {p50[HEALTH] * 1000:.2f} ms ({requests_sent} requests), of which "
        f"{p50[NOTHING] * 1000:.2f} ms is `requests` itself: the server's share "
        f"{(p50[HEALTH] - p50[NOTHING]) * 1000:.2f} ms"
    )
    return rows, note


def throughput(
    url: str, texts: list[str], clients: int, repeats: int
) -> tuple[list[float], list[float], list[tuple[list[float], list[bytes]]]]:
    """One client sending ``texts`` one by one, then ``clients`` threads sending them at once, the order
    alternating, ``repeats`` times: queries/s of each, and the concurrent runs' (latencies, bodies)."""
    alone_rates, together_rates, runs = [], [], []
    for repeat in range(repeats):
        for senders in (1, clients) if repeat % 2 == 0 else (clients, 1):
            latencies, bodies, total = concurrent(url, texts, senders)
            if senders == 1:
                alone_rates.append(len(texts) / total)
            else:
                together_rates.append(len(texts) / total)
                runs.append((latencies, bodies))
    return alone_rates, together_rates, runs


def workers_ceiling(service: SearchService, texts: list[str]) -> float:
    """The machine's ceiling for concurrent clients: ``service.workers`` threads encoding ``texts`` at
    once with the service's encoder (as its workers do, on their share of the threads), in texts/s,
    against one such thread alone."""
    encoder = TextEncoder(service.retriever, service.encode_config, threads=service.threads_per_worker)

    def encode_all() -> None:
        torch.set_num_threads(service.threads_per_worker)
        for text in texts:
            encoder(text, "query")

    encode_all()  # warm up
    started = time.perf_counter()
    encode_all()
    alone = time.perf_counter() - started
    threads = [threading.Thread(target=encode_all) for _ in range(service.workers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return service.workers * alone / (time.perf_counter() - started)


def batched(service: SearchService, url: str, texts: list[str], batch: int) -> tuple[list[str], float]:
    """Table rows of batches of ``batch`` queries per call; the library's rate."""
    ways = {"library `search()`": library(service), SERVICE: in_process(service), HTTP: Client(url)}
    groups = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    measured = interleaved(ways, groups)
    rates = {name: len(texts) / sum(latencies) for name, (latencies, _) in measured.items()}
    reference = rates["library `search()`"]
    rows = [
        row(f"batches of {batch}: {name}", latencies, len(texts), sum(latencies), reference)
        for name, (latencies, _) in measured.items()
    ]
    return rows, reference


def median_gap(measured: dict, whole: str, *parts: str) -> float:
    """Median over queries of ``whole``'s time minus its ``parts``' (measured on the same query), ms."""
    gaps = np.array(measured[whole][0]) - sum(np.array(measured[part][0]) for part in parts)
    return float(np.median(gaps)) * 1000


def latency_row(name: str, latencies: Sequence[float], floor: float) -> str:
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000, [50, 95, 99])
    return f"| {name} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {p50 / (floor * 1000):.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=300, help="test queries per phase (at most)")
    parser.add_argument("--batch", type=int, default=32, help="queries per batched call")
    parser.add_argument("--clients", type=int, default=8, help="threads sending at once")
    parser.add_argument("--repeats", type=int, default=3, help="alternations of one client and --clients")
    parser.add_argument("--health-requests", type=int, default=1000, help="GETs of the HTTP floor phase")
    parser.add_argument("--cold-starts", type=int, default=3, help="one-shot `sbmoe search` commands")
    parser.add_argument("--backend", default="auto", help="encoding backend (default: auto)")
    parser.add_argument("--precision", default="auto", help="encoding precision (default: auto)")
    parser.add_argument("--workdir", help="keep the saved model and index here (default: a temporary folder)")
    args = parser.parse_args()

    collection = scifact()
    texts = [collection.queries[q] for q in sorted(collection.split_qrels("test"))][: args.queries]
    single_table = ["| one query | p50 ms | p95 ms | p99 ms | p50 vs floor |", "|---|---:|---:|---:|---:|"]
    table = [
        "| how | p50 ms | p95 ms | p99 ms | queries/s | vs library in-process |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        model_dir, index_dir = prepare(Path(args.workdir or scratch))
        encode = EncodeConfig(backend=args.backend, precision=args.precision)
        retriever = Retriever.load(str(model_dir))
        index = open_index(index_dir, retriever.index_fingerprints())
        service = SearchService(retriever, index, SEARCH, encode)
        info = service.info()
        print(f"machine: {machine()}")
        print(
            f"{len(texts)} SciFact test queries x {info['index']['size']} documents ({MODEL}, "
            f"{DOC_TOKENS}-token documents, flat index), top {TOP_K}, loopback HTTP; encoding: "
            f"{info['encoding']['backend']} {info['encoding']['precision']}"
        )
        with served(model_dir, index_dir, encode) as url:
            rows, notes, measured, reference = single_queries(service, url, texts)
            single_table += rows
            print("\n".join(single_table), flush=True)
            batch_rows, _ = batched(service, url, texts, args.batch)
            table += batch_rows
            library_rate = len(texts) / sum(measured["library `search()`"][0])
            table.append(
                row(f"single: {HTTP}", measured[HTTP][0], len(texts), sum(measured[HTTP][0]), library_rate)
            )
            floor = float(np.percentile(measured[FLOOR][0], 50))
            floor_rows, floor_note = http_floor(url, args.health_requests, floor)
            single_table += floor_rows
            notes.append(floor_note)
            alone = [Client(url).post([text]) for text in texts]
            alone_rates, together_rates, runs = throughput(url, texts, args.clients, args.repeats)
            workers = requests.get(f"{url}/info").json()["concurrency"]
        ceiling = workers_ceiling(service, texts)
        latencies, bodies = runs[-1]
        name = f"{args.clients} clients at once, single queries: {HTTP} (last repeat)"
        table.append(row(name, latencies, len(texts), len(texts) / together_rates[-1], library_rate))
        rankings = [[hit["id"] for hit in json.loads(body)["results"][0]["hits"]] for body in bodies]
        ratios = [together / alone for together, alone in zip(together_rates, alone_rates, strict=True)]
        identical = sum(sum(map(bytes.__eq__, run_bodies, alone)) for _, run_bodies in runs)
        notes.append(
            f"{args.clients} clients against one, {args.repeats} alternating repeats ({workers}): "
            f"{np.median(together_rates):.1f} against {np.median(alone_rates):.1f} queries/s, ratio median "
            f"**{np.median(ratios):.2f}x** (each repeat: {', '.join(f'{r:.2f}x' for r in ratios)}); answers "
            f"byte-identical to the same query sent alone: {identical}/{len(texts) * len(runs)}; same top "
            f"{TOP_K} as the library at the service's numerics {same_top(rankings, reference)}; the "
            f"machine's ceiling: "
            f"{service.workers} threads encoding at once (as the workers do) {ceiling:.2f}x one alone"
        )
        if args.cold_starts:
            cold = cold_starts(model_dir, index_dir, texts[: args.cold_starts], encode)
            table.append(
                row("one-shot `sbmoe search` command per query", cold, len(cold), sum(cold), library_rate)
            )
    print()
    print("\n".join(table))
    print("\n".join(f"- {note}" for note in notes))


if __name__ == "__main__":
    main()
