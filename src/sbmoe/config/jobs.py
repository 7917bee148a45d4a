"""The configs of the inference jobs: encoding, indexing, evaluation, search, serving and reports, and
the options every job takes (:class:`JobOptions`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from sbmoe.config.base import ConfigBase, check_at_least, check_choices
from sbmoe.config.checks import (
    MAX_DOCUMENTS_TOP_K,
    MAX_ENCODE_BATCH_SIZE,
    check_at_most,
    check_metric_names,
    check_seed,
)
from sbmoe.config.fields import (
    documents_top_k_setting,
    encode_batch_size_setting,
    exclude_self_setting,
    expert_poolings_setting,
    inference_precision_setting,
    setting,
)
from sbmoe.core.choices import (
    BACKENDS,
    EMBEDDING_DTYPES,
    INDEX_TYPES,
    PAPER_METRICS,
    describe_auto_inference,
)
from sbmoe.core.errors import UsageError


@dataclass(frozen=True)
class JobOptions:
    """How a job runs, not what it computes: the options that travel together through every job.

    Attributes:
        show_progress: Progress bars.
        command: The command line recorded in the output's provenance (``None``: ``sys.argv``).
        cache: An :class:`sbmoe.inference.cache.EmbeddingCache` of pooled embeddings to reuse (typed
            loosely: config sits below inference).
        overwrite: Replace an earlier output of the same kind made with other settings (anything
            else at the output is refused anyway; see :func:`sbmoe.core.artifacts.writing_output`).
        shard: Index jobs: this process's part of the corpus, ``(i, N)``, the ``i``-th of ``N``
            consecutive slices (one per process or machine); ``None``: the whole corpus.
    """

    show_progress: bool = True
    command: Sequence[str] | None = None
    cache: Any = None
    overwrite: bool = False
    shard: tuple[int, int] | None = None


@dataclass
class EncodeConfig(ConfigBase):
    """How texts are encoded at inference (evaluate, index, search): batch, numerics, device."""

    encode_batch_size: int = encode_batch_size_setting()
    precision: str = inference_precision_setting()
    backend: str = setting(
        "auto",
        choices=BACKENDS,
        help="what runs the transformer: torch, onnx (ONNX Runtime, CPU; exported once per model and "
        f"cached), or {describe_auto_inference()}",
    )
    device: str = setting(
        "auto", help="auto (this process's GPU when there is one, else the CPU), cpu, cuda, cuda:N"
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        check_choices(self)
        check_at_least(self, 1, "encode_batch_size")
        check_at_most(
            "encode_batch_size",
            self.encode_batch_size,
            MAX_ENCODE_BATCH_SIZE,
            "activations grow with the texts of one forward pass",
        )


@dataclass
class IndexConfig(ConfigBase):
    """What kind of FAISS index to build (``sbmoe index``) or merge shards into (``sbmoe merge-index``)."""

    index_type: str | None = setting(
        None,
        choices=INDEX_TYPES,
        help="flat = exact search; hnsw or ivf = approximate, faster on large corpora "
        "(none given: flat, or the shards' type when merging)",
    )
    nlist: int | None = setting(
        None, help="ivf: number of cells (default about 2 sqrt(documents))", metavar="N"
    )
    nprobe: int | None = setting(
        None, help="ivf: cells searched per query (default 2 sqrt(nlist))", metavar="N"
    )
    embedding_dtype: str | None = setting(
        None,
        choices=EMBEDDING_DTYPES,
        help="how the index stores embeddings: float32, or float16 for half the memory and disk "
        "(none given: float32, or the shards' when merging)",
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        check_choices(self)
        check_at_least(self, 1, "nlist", "nprobe")


@dataclass
class EvaluateConfig(ConfigBase):
    """What an evaluation searches and scores."""

    split: str = setting("test", help="qrels split whose queries are searched")
    top_k: int = documents_top_k_setting(100)
    exclude_self: bool = exclude_self_setting()
    expert_poolings: list[str] = expert_poolings_setting("evaluate")
    metrics: list[str] = setting(default_factory=lambda: list(PAPER_METRICS), help="ranx metric names")
    corpus_index: str | None = setting(
        None,
        flag="--index",
        help="search this index of the corpus (a directory from `sbmoe index`, or a store URI from "
        "`sbmoe index --store`) instead of encoding the corpus and searching it exactly",
        metavar="INDEX",
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        check_choices(self)
        _check_top_k(self.top_k)
        check_metric_names(self.metrics)


@dataclass
class SearchConfig(ConfigBase):
    """How many documents a search returns per query, and under which inference rules.

    ``expert_poolings`` apply to exact search over texts (one run per rule from one encoding pass);
    an index holds its documents under the rule it was built with.
    """

    top_k: int = documents_top_k_setting(10)
    exclude_self: bool = exclude_self_setting()
    expert_poolings: list[str] = expert_poolings_setting("search")

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        check_choices(self)
        _check_top_k(self.top_k)


@dataclass
class ServeConfig(ConfigBase):
    """Where ``sbmoe serve`` listens and how much one request may ask for."""

    host: str = setting(
        "127.0.0.1",
        help="address to listen on: 127.0.0.1 answers this machine only; 0.0.0.0 every network "
        "(then set --api-key or SBMOE_API_KEY, and put TLS in front)",
    )
    port: int = setting(8000, help="TCP port (0: any free port, logged at start)")
    max_top_k: int = setting(1000, help="largest top_k a request may ask for", metavar="K")
    max_texts: int = setting(256, help="most queries (or texts to embed) in one request", metavar="N")
    max_batch_texts: int = setting(
        512, help="most texts answered in one round when waiting requests are micro-batched", metavar="N"
    )
    workers: int = setting(
        0,
        help="requests answered at once, each on its own share of the cores (0: one per CPU core, "
        "at most 4; one on a GPU); an answer is the same whichever worker gives it",
        metavar="N",
    )
    api_key: str | None = setting(
        None,
        help="a key every request but GET /health must give (Authorization: Bearer KEY or X-API-Key: KEY); "
        "default: $SBMOE_API_KEY, else none (prefer the variable: flags show in `ps`)",
        metavar="KEY",
    )
    max_request_bytes: int = setting(1 << 20, help="largest request body accepted (413 above)", metavar="N")

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port must be in [0, 65535], got {self.port}")
        if self.api_key is not None and not self.api_key.strip():
            raise UsageError("api_key is empty: give a key, or none to serve without one")
        check_at_least(self, 1, "max_top_k", "max_texts", "max_batch_texts", "max_request_bytes")
        check_at_least(self, 0, "workers")


@dataclass
class ReportConfig(ConfigBase):
    """How ``sbmoe report`` compares the systems of an experiment."""

    baseline: str = setting("fine-tuned", help="variant every system is tested against")
    metric: str = setting("ndcg@10", help="metric of the significance tests")
    test: Literal["t-test", "randomization"] = setting(
        "t-test",
        choices=("t-test", "randomization"),
        help="paired Student's t-test, or Fisher's randomization test",
    )
    alpha: float = setting(0.05, help="significance level (Bonferroni-corrected within each table)")
    randomization_seed: int = setting(42, help="seed of the randomization test")
    plots: bool = setting(True, help="draw the PNG plots (needs matplotlib)")
    timing: bool = setting(
        False,
        help="add what each system costs: mean training and evaluation seconds, and whether deploying "
        "it re-encodes the corpus (a head on the document side, or a fine-tuned backbone)",
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        check_choices(self)
        check_metric_names([self.metric], "metric")
        if not 0 < self.alpha < 1:
            raise UsageError(f"alpha must be in (0, 1), got {self.alpha}")
        check_seed("randomization_seed", self.randomization_seed)


def _check_top_k(top_k: int) -> None:
    if top_k < 1:
        raise UsageError(f"top_k must be >= 1, got {top_k}")
    check_at_most("top_k", top_k, MAX_DOCUMENTS_TOP_K, "search keeps queries x top_k scores and ids")
