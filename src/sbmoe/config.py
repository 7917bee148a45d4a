"""Configuration dataclasses for models and training, with the named presets.

Configs are plain dataclasses that round-trip through JSON. Loading tolerates unknown keys (a newer
version may have written them) and reports them as a warning instead of failing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import sys
import time
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, TypeVar

from sbmoe.errors import UsageError

# The paper's metrics (Sokli et al.), as ranx names them.
PAPER_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100", "precision@1", "ndcg@3")

GatingVariant = Literal["paper", "learned", "random"]
ExpertPooling = Literal["top1", "topk", "all"]
Similarity = Literal["auto", "cosine", "dot"]
Precision = Literal["auto", "fp32", "bf16"]

GATING_VARIANTS = ("paper", "learned", "random")
HEADS = ("moe", "linear")
EXPERT_POOLINGS = ("top1", "topk", "all")
SIMILARITIES = ("auto", "cosine", "dot")
PRECISIONS = ("auto", "fp32", "bf16")
INFERENCE_PRECISIONS = ("auto", "fp32", "bf16", "int8")
BACKENDS = ("auto", "torch", "onnx")
POOLINGS = ("mean", "cls", "max")
SCHEDULERS = ("constant", "linear", "cosine")
CHECKPOINT_SELECTIONS = ("best", "last")
INDEX_TYPES = ("flat", "hnsw", "ivf")
REPORT_TO = ("none", "tensorboard")
EMBEDDING_DTYPES = ("float32", "float16")


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    nargs: str | None = None,
    metavar: str | None = None,
) -> Any:
    """A config field with the help text and choices its command-line flag is generated from.

    Args:
        default: The field's default.
        help: One line for ``--help``; the default is appended by the parser.
        choices: Allowed values (also checked by ``validate``).
        flag: The flag when it is not ``--`` + the field name with dashes.
        default_factory: For mutable defaults.
        nargs: ``+`` for a list flag.
        metavar: Placeholder shown in ``--help``.
    """
    metadata = {"help": help, "choices": tuple(choices) if choices else None, "flag": flag}
    metadata.update(nargs=nargs, metavar=metavar)
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Settings that more than one job has, with the same meaning everywhere: defined once here.
def _precision_setting() -> Any:
    return setting(
        "auto",
        choices=PRECISIONS,
        help="bf16 (autocast, bf16 weight copies when encoding), fp32, or auto: bf16 where the "
        "CPU (AMX, AVX512-BF16) or GPU computes bf16 fast, else fp32",
    )


def _inference_precision_setting() -> Any:
    return setting(
        "auto",
        choices=INFERENCE_PRECISIONS,
        help="numerics of the backbone: fp32, bf16 (torch backend), int8 (onnx backend), or auto: "
        "what --backend auto picks for this machine",
    )


def _encode_batch_size_setting() -> Any:
    return setting(64, help="texts per forward pass when encoding", metavar="N")


def _documents_top_k_setting(default: int) -> Any:
    return setting(default, help="documents retrieved per query", metavar="K")


def _exclude_self_setting() -> Any:
    return setting(
        False,
        help="drop a retrieved document whose id equals the query id (BEIR's rule for collections "
        "whose queries are also documents, e.g. ArguAna, Quora)",
    )


@dataclass
class ModelConfig:
    """How to build an SB-MoE retriever from a backbone encoder (saved as ``sbmoe.json``)."""

    backbone: str = setting(
        "all-MiniLM-L6-v2",
        flag="--model",
        help="hub name, local directory (a saved sbmoe, sentence-transformers or transformers "
        "model), or all-MiniLM-L6-v2 (offline copy)",
    )
    pooling: str | None = setting(
        None, choices=POOLINGS, help="pooling of the last layer (none given: the backbone's own, else mean)"
    )
    similarity: Similarity = setting(
        "auto", choices=SIMILARITIES, help="cosine, dot, or auto (the backbone's own, else cosine)"
    )
    max_query_length: int | None = setting(
        None,
        help="token limit for queries (none given: the backbone's own limit, its max_seq_length, else 256)",
        metavar="TOKENS",
    )
    max_doc_length: int | None = setting(
        None,
        help="token limit for documents (none given: the backbone's own limit, its max_seq_length, else 256)",
        metavar="TOKENS",
    )
    num_experts: int = setting(
        6, help="experts in the MoE block; 0 = the plain fine-tuned baseline (no head)"
    )
    head: Literal["moe", "linear"] = setting(
        "moe",
        choices=HEADS,
        help="moe (the SB-MoE block, --num-experts experts; 0 = no head) or linear (a control: one "
        "zero-initialised residual Linear(d, d), no experts or gate; --num-experts is ignored)",
    )
    expert_pooling: ExpertPooling = setting(
        "top1",
        choices=EXPERT_POOLINGS,
        help="how expert outputs combine: top1, topk (--experts-top-k experts) or all (softmax-weighted)",
    )
    experts_top_k: int = setting(2, help="experts combined under --expert-pooling topk", metavar="K")
    gating: GatingVariant = setting(
        "learned",
        choices=GATING_VARIANTS,
        help="learned (the gate scales normalised expert outputs and trains), paper (the published "
        "code: the gate cancels and gets no gradient) or random (gate fixed at its initialisation)",
    )
    noisy_gating: bool = setting(True, help="add learned Gaussian noise to the gate logits while training")
    expert_dropout: float = setting(
        0.0, help="probability of hiding an expert from a text while training", metavar="P"
    )
    lowercase: bool = setting(False, help="lower-case every query and document before tokenisation")

    # Keys that older versions wrote under another name.
    RENAMED: ClassVar[dict[str, str]] = {"top_k": "experts_top_k"}

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        _check_choices(self)
        if self.num_experts < 0:
            raise UsageError(f"num_experts must be >= 0 (0 = no MoE head), got {self.num_experts}")
        if self.expert_pooling == "topk" and not 1 <= self.experts_top_k <= max(self.num_experts, 1):
            raise UsageError(
                f"experts_top_k must be between 1 and num_experts={self.num_experts}, "
                f"got {self.experts_top_k}"
            )
        if not 0 <= self.expert_dropout < 1:
            raise UsageError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        for name in ("max_query_length", "max_doc_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise UsageError(f"{name} must be at least 2 tokens, got {value}")


@dataclass
class TrainConfig:
    """How to fine-tune: optimisation, loss, model selection and precision."""

    epochs: int = setting(1, help="passes over the training pairs")
    max_steps: int | None = setting(None, help="stop after this many optimiser steps", metavar="N")
    batch_size: int = setting(
        32, help="query-document pairs per step (per process); the batch's other documents are negatives"
    )
    lr_backbone: float = setting(2e-5, help="learning rate of the transformer and pooling", metavar="LR")
    lr_head: float = setting(1e-3, help="learning rate of the MoE head (experts, gate, noise)", metavar="LR")
    weight_decay: float = setting(0.01, help="AdamW weight decay")
    temperature: float = setting(
        0.05, help="scores are divided by it before the in-batch cross-entropy (0.05 = scale 20)"
    )
    scheduler: Literal["constant", "linear", "cosine"] = setting(
        "linear", choices=SCHEDULERS, help="learning-rate schedule after warm-up (decays to zero)"
    )
    warmup_ratio: float = setting(0.1, help="share of the steps spent warming up", metavar="RATIO")
    max_grad_norm: float = setting(1.0, help="gradient clipping norm; 0 disables clipping")
    load_balancing_coef: float = setting(
        0.01, help="weight of the Switch load-balancing loss (learned gating)", metavar="COEF"
    )
    router_z_loss_coef: float = setting(
        1e-3, help="weight of the router z-loss (learned gating)", metavar="COEF"
    )
    mask_false_negatives: bool = setting(
        True, help="do not count a batch document judged relevant to a query as its negative"
    )
    symmetric_loss: bool = setting(False, help="add a document -> query in-batch loss")
    hard_negatives: int = setting(0, help="mined negatives per query added to each batch", metavar="K")
    negatives_source: str = setting(
        "bm25", help="bm25, dense (the starting model's ranking) or a JSON file of query id -> doc ids"
    )
    negatives_depth: int = setting(100, help="ranking depth when mining negatives", metavar="N")
    collapse_threshold: float = setting(
        0.9, help="warn when one expert takes more than this share of an epoch's texts", metavar="SHARE"
    )
    seed: int = setting(42, help="seed of every random choice (order, dev split, initialisation, noise)")
    train_file: str | None = setting(
        None,
        help="train on this file instead of --data: Tevatron JSONL, query/positive/negative triples "
        "(TSV or JSONL) or a Hugging Face dataset folder (save_to_disk); its listed negatives are the "
        "hard negatives (--hard-negatives K, 1 unless given), dev queries are held out of it "
        "(--dev-fraction)",
        metavar="PATH",
    )
    file_negatives: bool = setting(
        True,
        help="use the negatives a --train-file lists, 1 per query unless --hard-negatives says more "
        "(--no-file-negatives: in-batch negatives only)",
    )
    train_split: str = setting("train", help="qrels split the training pairs come from")
    dev_split: str | None = setting(
        "dev", help="qrels split for model selection; without it a seeded --dev-fraction is held out"
    )
    dev_fraction: float = setting(0.1, help="share of training queries held out as dev", metavar="SHARE")
    dev_max_docs: int | None = setting(
        None, help="dev corpus: the dev positives plus random documents up to N (default: all)", metavar="N"
    )
    eval_steps: int | None = setting(None, help="also evaluate on dev every N steps", metavar="N")
    checkpoint_steps: int | None = setting(500, help="save a resumable checkpoint every N steps", metavar="N")
    checkpoint_selection: Literal["best", "last"] = setting(
        "best",
        choices=CHECKPOINT_SELECTIONS,
        help="best dev nDCG@10 (the starting model competes) or the last checkpoint",
    )
    precision: Precision = _precision_setting()
    encode_batch_size: int = _encode_batch_size_setting()
    freeze_backbone: bool = setting(
        False, help="train the MoE head only; texts still run through the frozen backbone"
    )
    head_only: bool = setting(
        False, help="train the MoE head only, on pooled embeddings computed once and cached"
    )
    length_grouped: bool = setting(False, help="batch pairs of similar document length (less padding)")
    grad_cache_chunk_size: int = setting(
        0,
        help="gradient caching: embed a step's texts N at a time (big batches, little memory; 0 = off)",
        metavar="N",
    )
    report_to: str = setting(
        "none",
        choices=REPORT_TO,
        help="also write loss terms, learning rates, dev scores and expert usage for TensorBoard into "
        "OUTPUT/training/tensorboard (needs the tensorboard extra)",
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        _check_choices(self)
        if self.batch_size < 2:
            raise UsageError(f"batch_size must be >= 2 for in-batch negatives, got {self.batch_size}")
        if self.grad_cache_chunk_size < 0:
            raise UsageError(f"grad_cache_chunk_size must be >= 0, got {self.grad_cache_chunk_size}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs < 1 and self.max_steps is None:
            raise UsageError("epochs must be >= 1 unless max_steps is set")
        for name in ("max_steps", "eval_steps", "checkpoint_steps", "dev_max_docs", "negatives_depth"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")
        rates = ("lr_backbone", "lr_head", "weight_decay", "max_grad_norm")
        for name in (*rates, "load_balancing_coef", "router_z_loss_coef", "temperature"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UsageError(f"{name} must be a finite number >= 0, got {value}")
        if not 0 <= self.warmup_ratio <= 1:
            raise UsageError(f"warmup_ratio must be in [0, 1], got {self.warmup_ratio}")
        if not 0 <= self.collapse_threshold <= 1:
            raise UsageError(f"collapse_threshold must be in [0, 1], got {self.collapse_threshold}")
        if self.hard_negatives < 0:
            raise UsageError(f"hard_negatives must be >= 0, got {self.hard_negatives}")
        if not 0 < self.dev_fraction < 1:
            raise UsageError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if self.encode_batch_size < 1:
            raise UsageError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")


@dataclass
class EncodeConfig:
    """How texts are encoded at inference (evaluate, index, search): batch, numerics, device."""

    encode_batch_size: int = _encode_batch_size_setting()
    precision: str = _inference_precision_setting()
    backend: str = setting(
        "auto",
        choices=BACKENDS,
        help="what runs the transformer: torch, onnx (ONNX Runtime, CPU; exported once per model and "
        "cached), or auto: bf16 torch on CPUs with AMX/AVX512-BF16 and on GPUs, int8 onnx on other "
        "x86 CPUs when onnxruntime is installed, else fp32 torch",
    )
    device: str = setting(
        "auto", help="auto (this process's GPU when there is one, else the CPU), cpu, cuda, cuda:N"
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        _check_choices(self)
        if self.encode_batch_size < 1:
            raise UsageError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")


@dataclass
class IndexConfig:
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
        _check_choices(self)
        for name in ("nlist", "nprobe"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UsageError(f"{name} must be >= 1, got {value}")


@dataclass
class EvaluateConfig:
    """What an evaluation searches and scores."""

    split: str = setting("test", help="qrels split whose queries are searched")
    top_k: int = _documents_top_k_setting(100)
    exclude_self: bool = _exclude_self_setting()
    expert_poolings: list[str] = setting(
        default_factory=list,
        flag="--expert-pooling",
        choices=EXPERT_POOLINGS,
        nargs="+",
        help="inference rule(s) of an MoE model to evaluate; several share one encoding pass "
        "(none given: the model's own)",
    )
    metrics: list[str] = setting(
        default_factory=lambda: list(PAPER_METRICS), nargs="+", help="ranx metric names"
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        _check_choices(self)
        if self.top_k < 1:
            raise UsageError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class SearchConfig:
    """How many documents a search returns per query."""

    top_k: int = _documents_top_k_setting(10)
    exclude_self: bool = _exclude_self_setting()

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        if self.top_k < 1:
            raise UsageError(f"top_k must be >= 1, got {self.top_k}")


@dataclass
class ServeConfig:
    """Where ``sbmoe serve`` listens and how much one request may ask for."""

    host: str = setting(
        "127.0.0.1",
        help="address to listen on: 127.0.0.1 answers this machine only; 0.0.0.0 every network "
        "(there is no authentication: put a proxy in front)",
    )
    port: int = setting(8000, help="TCP port (0: any free port, logged at start)")
    max_top_k: int = setting(1000, help="largest top_k a request may ask for", metavar="K")
    max_texts: int = setting(256, help="most queries (or texts to embed) in one request", metavar="N")
    max_batch_texts: int = setting(
        512, help="most texts encoded together when waiting requests are micro-batched", metavar="N"
    )

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        if not 0 <= self.port <= 65535:
            raise UsageError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_top_k", "max_texts", "max_batch_texts"):
            if getattr(self, name) < 1:
                raise UsageError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class ReportConfig:
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

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value."""
        _check_choices(self)
        if not 0 < self.alpha < 1:
            raise UsageError(f"alpha must be in (0, 1), got {self.alpha}")


@dataclass
class Preset:
    """Named defaults for a model and its training."""

    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(
        description=(
            "Follows the backbone's own pooling, similarity and max length; learned gating with "
            "load balancing; AdamW 2e-5 (backbone) / 1e-3 (head), temperature 0.05, batch 32, "
            "warm-up + linear decay, best checkpoint on dev nDCG@10, bf16 where the hardware is fast."
        ),
    ),
    "paper": Preset(
        description=(
            "The published SB-MoE recipe: mean pooling, dot product on unnormalised embeddings, "
            "512 tokens, paper gating (noisy top-1), head lr 1e-4 / backbone lr 1e-6, constant "
            "schedule, batch 64, temperature 1, lower-cased texts, last epoch kept, float32."
        ),
        model={
            "pooling": "mean",
            "similarity": "dot",
            "max_query_length": 512,
            "max_doc_length": 512,
            "gating": "paper",
            "lowercase": True,
        },
        train={
            "epochs": 30,
            "batch_size": 64,
            "lr_backbone": 1e-6,
            "lr_head": 1e-4,
            "weight_decay": 0.01,
            "temperature": 1.0,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 0.0,
            "load_balancing_coef": 0.0,
            "router_z_loss_coef": 0.0,
            "mask_false_negatives": False,
            "dev_fraction": 0.05,
            "checkpoint_selection": "last",
            "precision": "fp32",
        },
    ),
}

ConfigT = TypeVar("ConfigT")


def from_dict(cls: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
    """Build ``cls`` from ``data``, warning about (and ignoring) keys it does not know."""
    renamed = getattr(cls, "RENAMED", {})
    data = {renamed.get(key, key): value for key, value in data.items()}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown {cls.__name__} keys {unknown}", stacklevel=2)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in known and not _has_type(value, hints[key]):
            raise UsageError(f"{source}: {key} must be {_type_name(hints[key])}, got {value!r}")
    return cls(**{key: value for key, value in data.items() if key in known})


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON/YAML value fits a config field's type (ints count as floats, bools as nothing else)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def build_configs(
    preset: str = "default",
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Start from a preset, apply explicit overrides (``None`` values are skipped), and validate."""
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    chosen = PRESETS[preset]
    model_values = {**chosen.model, **{k: v for k, v in (model_overrides or {}).items() if v is not None}}
    train_values = {**chosen.train, **{k: v for k, v in (train_overrides or {}).items() if v is not None}}
    model_config = from_dict(ModelConfig, model_values, source=f"preset {preset}")
    train_config = from_dict(TrainConfig, train_values, source=f"preset {preset}")
    model_config.validate()
    train_config.validate()
    return model_config, train_config


PROVENANCE_PACKAGES = (
    "sbmoe",
    "torch",
    "transformers",
    "sentence-transformers",
    "faiss-cpu",
    "ranx",
    "numpy",
)


def provenance(command: Sequence[str] | None = None) -> dict[str, Any]:
    """What produced an output: the exact command, package versions, Python, CPU class and time.

    Saved beside every output (model, training run, evaluation, index, experiment). Reads versions
    from package metadata, so it imports nothing heavy.
    """
    from sbmoe.runtime import cpu_description

    versions = {}
    for package in PROVENANCE_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "command": list(command) if command is not None else list(sys.argv),
        "versions": versions,
        "python": sys.version.split()[0],
        "cpu": cpu_description(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _check_choices(config: Any) -> None:
    """Raise ``UsageError`` for the first field whose value is not among its declared choices."""
    for item in dataclasses.fields(config):
        choices = item.metadata.get("choices")
        value = getattr(config, item.name)
        values = value if isinstance(value, list) else [value]
        if choices and any(v is not None and v not in choices for v in values):
            raise UsageError(f"{item.name} must be one of {list(choices)}, got {value!r}")
