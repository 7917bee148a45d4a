"""Configuration dataclasses for models and training, with the named presets.

Configs are plain dataclasses that round-trip through JSON. Loading tolerates unknown keys (a newer
version may have written them) and reports them as a warning instead of failing.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from sbmoe.errors import UsageError

GatingVariant = Literal["paper", "learned", "random"]
ExpertPooling = Literal["top1", "topk", "all"]
Similarity = Literal["auto", "cosine", "dot"]
Precision = Literal["auto", "fp32", "bf16"]

GATING_VARIANTS = ("paper", "learned", "random")
EXPERT_POOLINGS = ("top1", "topk", "all")
SIMILARITIES = ("auto", "cosine", "dot")
PRECISIONS = ("auto", "fp32", "bf16")
POOLINGS = ("mean", "cls", "max")


@dataclass
class ModelConfig:
    """How to build an SB-MoE retriever from a backbone encoder.

    Attributes:
        backbone: Hugging Face hub name, local directory, or ``all-MiniLM-L6-v2`` (offline copy).
        pooling: ``mean``, ``cls`` or ``max``; ``None`` keeps a sentence-transformers backbone's own
            pooling and uses ``mean`` for a plain transformer.
        similarity: ``cosine`` (L2-normalised embeddings, dot product), ``dot`` (raw dot product) or
            ``auto`` (the backbone's own choice where it records one, else ``cosine``).
        max_query_length: Token limit for queries.
        max_doc_length: Token limit for documents; ``None`` takes the backbone's max_seq_length (or 256).
        num_experts: Experts in the MoE block; 0 builds the plain fine-tuned baseline (no head).
        expert_pooling: How expert outputs are combined: ``top1``, ``topk`` (``top_k`` experts) or
            ``all`` (softmax-weighted sum of every expert).
        top_k: Experts combined under ``topk``.
        gating: ``paper`` reproduces the published code (the gate cancels under normalisation and
            gets no gradient); ``learned`` scales each normalised expert output by its gate weight;
            ``random`` combines like ``learned`` but keeps the gate at its random initialisation
            (a fixed random assignment: mixture without learned routing, a control).
        noisy_gating: Add learned Gaussian noise to the gate logits while training.
        expert_dropout: Probability of hiding an expert from a text while training.
        lowercase: Lower-case every query and document before tokenisation.
    """

    backbone: str = "all-MiniLM-L6-v2"
    pooling: str | None = None
    similarity: Similarity = "auto"
    max_query_length: int = 64
    max_doc_length: int | None = None
    num_experts: int = 6
    expert_pooling: ExpertPooling = "top1"
    top_k: int = 2
    gating: GatingVariant = "learned"
    noisy_gating: bool = True
    expert_dropout: float = 0.0
    lowercase: bool = False

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that holds an unusable value."""
        _check_choice("pooling", self.pooling, (None, *POOLINGS))
        _check_choice("similarity", self.similarity, SIMILARITIES)
        _check_choice("expert_pooling", self.expert_pooling, EXPERT_POOLINGS)
        _check_choice("gating", self.gating, GATING_VARIANTS)
        if self.num_experts < 0:
            raise UsageError(f"num_experts must be >= 0 (0 = no MoE head), got {self.num_experts}")
        if self.expert_pooling == "topk" and not 1 <= self.top_k <= max(self.num_experts, 1):
            raise UsageError(f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        for name in ("max_query_length", "max_doc_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise UsageError(f"{name} must be at least 2 tokens, got {value}")


@dataclass
class TrainConfig:
    """How to fine-tune: optimisation, loss, model selection and precision.

    Attributes:
        epochs: Passes over the training pairs.
        max_steps: Stop after this many optimiser steps (overrides ``epochs`` when reached first).
        batch_size: Query-document pairs per step; the other documents of the batch are the negatives.
        lr_backbone: Learning rate of the transformer and pooling.
        lr_head: Learning rate of the MoE head (experts, gate, noise).
        weight_decay: AdamW weight decay.
        temperature: Scores are divided by it before the in-batch cross-entropy.
        scheduler: ``constant``, ``linear`` (warm-up, then linear decay to zero) or ``cosine``
            (warm-up, then cosine decay to zero).
        warmup_ratio: Share of the steps spent warming up under ``linear``.
        max_grad_norm: Gradient clipping norm; 0 disables clipping.
        load_balancing_coef: Weight of the Switch load-balancing loss (learned gating only).
        router_z_loss_coef: Weight of the router z-loss (learned gating only).
        mask_false_negatives: Do not count a batch document as a negative for a query it is
            relevant to (another query's positive that is also judged relevant, duplicates).
        symmetric_loss: Average the query -> document loss with a document -> query one.
        hard_negatives: Mined negatives added to the batch per query (0: in-batch negatives only).
        negatives_source: ``bm25``, ``dense`` (the starting model's own ranking) or a JSON file of
            query id -> doc ids. Mined negatives never include a judged positive.
        negatives_depth: How deep to rank when mining.
        collapse_threshold: Warn when one expert takes more than this share of an epoch's queries
            or documents.
        seed: Seed for every random choice (data order, dev split, initialisation, gate noise).
        train_split: Qrels split the training pairs come from.
        dev_split: Qrels split used for model selection if the collection has it; otherwise a
            seeded ``dev_fraction`` of the training queries is held out.
        dev_fraction: Share of training queries held out when there is no dev split.
        dev_max_docs: Evaluate dev on the dev positives plus random other documents up to this
            many (seeded); ``None`` uses the whole corpus.
        eval_steps: Also evaluate on dev every this many steps (besides each epoch's end).
        checkpoint_steps: Save a resumable checkpoint every this many steps (and at each epoch's end).
        checkpoint_selection: ``best`` keeps the model with the best dev nDCG@10 (the starting model
            included); ``last`` keeps the last one, as the published code does.
        precision: ``bf16`` autocast, ``fp32``, or ``auto`` (bf16 where the hardware has fast bf16).
        encode_batch_size: Batch size when encoding for dev evaluation.
        freeze_backbone: Train the MoE head only; texts still run through the (frozen, eval-mode)
            backbone at every step.
        head_only: Train the MoE head only, on pooled backbone embeddings computed once and kept
            in the embedding cache: no tokenizer or transformer in the loop. Same result as
            ``freeze_backbone`` for the same seed and data, many times faster.
        length_grouped: Batch pairs of similar document length together (less padding, faster
            steps; batches are still shuffled every epoch).
        grad_cache_chunk_size: Gradient caching: embed a step's texts this many at a time and
            hold the activations of one chunk only, so a batch far larger than memory allows
            trains with the same gradients, for about one more forward pass (0: off).
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 32
    lr_backbone: float = 2e-5
    lr_head: float = 1e-3
    weight_decay: float = 0.01
    temperature: float = 0.05
    scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0
    load_balancing_coef: float = 0.01
    router_z_loss_coef: float = 1e-3
    mask_false_negatives: bool = True
    symmetric_loss: bool = False
    hard_negatives: int = 0
    negatives_source: str = "bm25"
    negatives_depth: int = 100
    collapse_threshold: float = 0.9
    seed: int = 42
    train_split: str = "train"
    dev_split: str | None = "dev"
    dev_fraction: float = 0.1
    dev_max_docs: int | None = None
    eval_steps: int | None = None
    checkpoint_steps: int | None = 500
    checkpoint_selection: Literal["best", "last"] = "best"
    precision: Precision = "auto"
    encode_batch_size: int = 64
    freeze_backbone: bool = False
    head_only: bool = False
    length_grouped: bool = False
    grad_cache_chunk_size: int = 0

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first field that holds an unusable value."""
        _check_choice("scheduler", self.scheduler, ("constant", "linear", "cosine"))
        _check_choice("checkpoint_selection", self.checkpoint_selection, ("best", "last"))
        _check_choice("precision", self.precision, PRECISIONS)
        if self.batch_size < 2:
            raise UsageError(f"batch_size must be >= 2 for in-batch negatives, got {self.batch_size}")
        if self.grad_cache_chunk_size < 0:
            raise UsageError(f"grad_cache_chunk_size must be >= 0, got {self.grad_cache_chunk_size}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs < 1 and self.max_steps is None:
            raise UsageError("epochs must be >= 1 unless max_steps is set")
        if not 0 < self.dev_fraction < 1:
            raise UsageError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")


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

ConfigT = TypeVar("ConfigT", ModelConfig, TrainConfig)


def from_dict(cls: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
    """Build ``cls`` from ``data``, warning about (and ignoring) keys it does not know."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown {cls.__name__} keys {unknown}", stacklevel=2)
    return cls(**{key: value for key, value in data.items() if key in known})


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


def _check_choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {[c for c in choices if c is not None]}, got {value!r}")
