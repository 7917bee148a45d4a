"""A search service: a model and its index loaded once, answering searches and encodings from threads.

Concurrency: worker threads, each on its own share of the cores, micro-batching. Callers on any
thread submit jobs and get a :class:`~concurrent.futures.Future`. Whenever a worker is free it takes
every job waiting (up to ``max_batch_texts`` texts) and answers them in one round; one lone request
is answered at once, without waiting for company. On a CPU there is one worker per core (at most
:data:`MAX_WORKERS`), each running its forward passes on ``cores // workers`` threads: one short
query keeps two threads busy poorly, so two workers on two cores answer about twice the queries
of one (bench/bench_serve.py), while one worker per GPU keeps its kernels in one stream.

The same answer for the same question: every text is encoded in a forward pass of its own, at its
own length (:class:`~sbmoe.inference.encoding.TextEncoder`), on the same number of threads
whichever worker runs it, and every query searches the index alone, so a response is the same
bytes whether its request came alone or among others, under every precision and backend (bf16
matrix kernels on AMX CPUs and int8's per-batch activation scales change a text's embedding with
the batch it is padded into). A text asked twice in one round is encoded once.

The steps are those of :func:`sbmoe.retrieval.search.search` (backbone up to pooling, then the head
in float32, then the index), so a query ranks as ``sbmoe search`` ranks it at the same numerics
(``auto`` resolves them for one text at a time: :class:`~sbmoe.inference.encoding.TextEncoder`).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sbmoe import __version__
from sbmoe.config.jobs import EncodeConfig, SearchConfig, ServeConfig
from sbmoe.core.cpu import usable_cores
from sbmoe.core.errors import SbmoeError, UsageError
from sbmoe.data.beir import BeirCollection, Document
from sbmoe.inference.encoding import EncodedText, TextEncoder
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.interface import Index
from sbmoe.retrieval.sharded.index import ShardedIndex

KINDS = ("query", "document")
# Beyond a few workers, a CPU's cores serve one query's matrices better than more queries at once.
MAX_WORKERS = 4
NO_DOCUMENTS = "documents: the service was started without the collection the index was built from (--data)"


@dataclass
class SearchResult:
    """One query's answer: its top documents, best first, and (when asked) its routing.

    Attributes:
        hits: (doc id, score) pairs, best first.
        expert: The query's top-1 expert in the MoE head (when routing was asked for).
        gate: The head's gate probabilities over its experts for the query (idem).
    """

    hits: list[tuple[str, float]]
    expert: int | None = None
    gate: list[float] | None = None


@dataclass
class _Job:
    texts: list[str]
    kind: str
    future: concurrent.futures.Future
    top_k: int | None = None  # None: an encoding, not a search
    routing: bool = False


class ServiceClosedError(SbmoeError):
    """A request reached a service that is shutting down or shut down."""


class SearchService:
    """A retriever and its index, answering :meth:`search` and :meth:`embed` from any thread.

    The worker thread starts with the service and stops at :meth:`close` (or at the end of a
    ``with`` block), after finishing the jobs already submitted.

    Args:
        retriever: The model that built the index.
        index: The index; :func:`~sbmoe.retrieval.interface.open_index` opens a saved one and, given
            the model's :meth:`~sbmoe.model.retriever.Retriever.index_fingerprints`, refuses one
            built by another model.
        search: The default ``top_k`` of :meth:`search`.
        encode: Backend, precision and batch size of the encodings.
        collection: The collection the index was built from, to look up titles and texts
            (:meth:`document`); it must hold every document of the index.
        config: ``max_batch_texts`` (most texts answered in one round of a worker) and ``workers``
            (worker threads answering at once; 0: one per CPU core, at most :data:`MAX_WORKERS`,
            one on a GPU; each encodes on ``cores // workers`` threads); the rest is the server's.
    """

    def __init__(
        self,
        retriever: Retriever,
        index: Index,
        search: SearchConfig | None = None,
        encode: EncodeConfig | None = None,
        *,
        collection: BeirCollection | None = None,
        config: ServeConfig | None = None,
    ) -> None:
        self.retriever = retriever
        self.search_config = search or SearchConfig()
        self.search_config.validate()
        self.encode_config = encode or EncodeConfig()
        self.encode_config.validate()
        config = config or ServeConfig()
        config.validate()
        self.max_batch_texts = config.max_batch_texts
        self.fingerprint = retriever.fingerprint()  # a hash of every weight: computed once
        self.index = index
        self.documents: Mapping[str, Document] | None = None
        self.collection: str | None = None
        if collection is not None:
            missing = [doc_id for doc_id in index.doc_ids if doc_id not in collection.corpus]
            if missing:
                raise UsageError(
                    f"{len(missing)} of the index's {len(index)} documents are not in the collection "
                    f"{collection.name} (e.g. {missing[0]!r}): give the one the index was built from"
                )
            self.documents, self.collection = collection.corpus, collection.name
        self.stats = {"requests": 0, "batches": 0, "texts": 0}
        self.workers, self.threads_per_worker = _worker_threads(config.workers or None, retriever.device)
        # Set up once, not per request: bf16 weight copies, or an ONNX Runtime session per worker.
        encoder = TextEncoder(retriever, self.encode_config, threads=self.threads_per_worker)
        encoder("warm up", "query")
        self._encoders = [encoder, *(encoder.twin() for _ in range(self.workers - 1))]
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._workers = [
            threading.Thread(target=self._work, args=(encoder,), name=f"sbmoe-search-worker-{n}", daemon=True)
            for n, encoder in enumerate(self._encoders)
        ]
        for worker in self._workers:
            worker.start()

    # ------------------------------------------------------------------------------- public API
    @property
    def alive(self) -> bool:
        """Whether the worker threads are running (jobs are being answered)."""
        return all(worker.is_alive() for worker in self._workers)

    @property
    def dim(self) -> int:
        """Dimension of the embeddings."""
        return int(self.index.dim)

    def search(
        self, queries: Sequence[str], top_k: int | None = None, *, routing: bool = False
    ) -> concurrent.futures.Future[list[SearchResult]]:
        """Submit queries; the future resolves to one :class:`SearchResult` per query, in order.

        Args:
            queries: Query texts.
            top_k: Documents per query (default: the service's ``search`` config).
            routing: Also report each query's top-1 expert and gate probabilities (models with an
                MoE head only).

        Raises:
            UsageError: No queries, ``top_k`` below 1, or routing asked of a model without a head.
        """
        top_k = self.search_config.top_k if top_k is None else top_k
        if top_k < 1:
            raise UsageError(f"top_k must be >= 1, got {top_k}")
        if routing and self.retriever.head is None:
            raise UsageError("routing: this model has no MoE head")
        return self._submit(_Job(list(queries), "query", concurrent.futures.Future(), top_k, routing))

    def embed(self, texts: Sequence[str], kind: str = "query") -> concurrent.futures.Future[np.ndarray]:
        """Submit texts; the future resolves to their embeddings, float32 ``(len(texts), dim)``.

        Args:
            texts: Queries or documents (documents as "title text").
            kind: ``query`` or ``document``: selects the token limit.
        """
        if kind not in KINDS:
            raise UsageError(f"kind must be one of {list(KINDS)}, got {kind!r}")
        return self._submit(_Job(list(texts), kind, concurrent.futures.Future()))

    def document(self, doc_id: str) -> Document:
        """The title and text of an indexed document (needs ``documents``)."""
        if self.documents is None:
            raise UsageError(NO_DOCUMENTS)
        return self.documents[doc_id]

    def info(self) -> dict[str, Any]:
        """What is served: model, index, encoding, device, versions, and the requests so far."""
        head = self.retriever.head
        index = self.index
        plan = self._encoders[0].plan
        return {
            "sbmoe_version": __version__,
            "model": {
                "backbone": self.retriever.config.backbone,
                "fingerprint": self.fingerprint,
                "experts": head.num_experts if head is not None else 0,
                "expert_pooling": head.expert_pooling if head is not None else None,
                "head_side": self.retriever.config.head_side,
            },
            "index": {
                "path": index.location,
                "size": len(index),
                "type": index.index_type,
                "dtype": index.dtype,
                "dim": self.dim,
                "shards": index.num_shards if isinstance(index, ShardedIndex) else None,
                "collection": index.metadata.get("collection"),
            },
            "documents": self.collection if self.documents is not None else None,
            "encoding": {"backend": plan.backend, "precision": plan.precision, "reason": plan.reason},
            "device": str(self.retriever.device),
            "default_top_k": self.search_config.top_k,
            "concurrency": (
                f"{self.workers} workers of {self.threads_per_worker} threads, each answering up to "
                f"{self.max_batch_texts} waiting texts per round, each text encoded alone (an answer "
                "does not depend on the other requests)"
            ),
            "stats": dict(self.stats),
        }

    def close(self) -> None:
        """Finish the jobs already submitted, then stop the worker; later submissions are refused."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for _ in self._workers:
                self._queue.put(None)
        for worker in self._workers:
            worker.join()

    def __enter__(self) -> SearchService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---------------------------------------------------------------------------------- worker
    def _submit(self, job: _Job) -> concurrent.futures.Future:
        if not job.texts:
            raise UsageError("no texts given")
        if not all(isinstance(text, str) and text.strip() for text in job.texts):
            raise UsageError("a text is empty: give the text to encode")
        with self._lock:
            if self._closed:
                raise ServiceClosedError("the search service is closed")
            self._queue.put(job)
        return job.future

    def _work(self, encoder: TextEncoder) -> None:
        # This thread's forward passes, whichever worker runs them, use the same number of threads.
        torch.set_num_threads(self.threads_per_worker)
        encoder("warm up", "query")
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, texts, stop = [job], len(job.texts), False
            while texts < self.max_batch_texts:
                try:
                    waiting = self._queue.get_nowait()
                except queue.Empty:
                    break
                if waiting is None:
                    stop = True
                    break
                jobs.append(waiting)
                texts += len(waiting.texts)
            self._run(encoder, [job for job in jobs if job.future.set_running_or_notify_cancel()])
            if stop:
                return

    def _run(self, encoder: TextEncoder, jobs: list[_Job]) -> None:
        """Answer one round of jobs; an error fails its job only, not the others or the worker."""
        encoded: dict[tuple[str, str], EncodedText] = {}
        for job in jobs:
            try:
                answer = self._answer(encoder, job, encoded)
            except Exception as error:  # handed to the caller, whose thread reports it
                job.future.set_exception(error)
                continue
            with self._lock:
                self.stats["requests"] += 1
                self.stats["texts"] += len(job.texts)
            job.future.set_result(answer)
        with self._lock:
            self.stats["batches"] += 1

    def _answer(self, encoder: TextEncoder, job: _Job, encoded: dict[tuple[str, str], EncodedText]) -> Any:
        """``job``'s answer, every text encoded alone (or found in ``encoded``, this round's encodings).

        A query's routing is the one its own encoding took (not the head run again: a hook on the
        shared head would also hear the other workers' texts).
        """
        vectors = []
        for text in job.texts:
            if (text, job.kind) not in encoded:
                encoded[text, job.kind] = encoder(text, job.kind)
            vectors.append(encoded[text, job.kind])
        if job.top_k is None:
            return np.concatenate([vector.embedding for vector in vectors])
        results = []
        for vector in vectors:
            hits = self.index.search(vector.embedding, job.top_k, query_ids=["q"])["q"]
            result = SearchResult(list(hits.items()))
            if job.routing:
                result.expert, result.gate = vector.expert, vector.gate
            results.append(result)
        return results


def _worker_threads(workers: int | None, device: torch.device) -> tuple[int, int]:
    """How many workers answer at once, and on how many threads each encodes."""
    cores = usable_cores()
    if workers is None:
        workers = 1 if device.type != "cpu" else min(cores, MAX_WORKERS)
    if workers < 1:
        raise UsageError(f"workers must be >= 1, got {workers}")
    return workers, max(1, cores // workers)
