"""The training config: optimisation, loss, negatives, model selection, checkpoints and precision."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sbmoe.config.base import ConfigBase, check_choices
from sbmoe.config.checks import (
    MAX_DOCUMENTS_TOP_K,
    MAX_ENCODE_BATCH_SIZE,
    MAX_HARD_NEGATIVES,
    MAX_IN_BATCH_SCORES,
    check_at_most,
    check_seed,
)
from sbmoe.config.fields import encode_batch_size_setting, precision_setting, setting
from sbmoe.core.choices import CHECKPOINT_SELECTIONS, REPORT_TO, SCHEDULERS, Precision
from sbmoe.core.errors import UsageError


@dataclass
class TrainConfig(ConfigBase):
    """How to fine-tune: optimisation, loss, model selection and precision."""

    epochs: int = setting(1, help="passes over the training pairs")
    max_steps: int | None = setting(None, help="stop after this many optimiser steps", metavar="N")
    max_train_pairs: int | None = setting(
        None,
        help="train on a sample of N of the training pairs, drawn with --seed (the data axis of a study; "
        "default: all); every judgement still masks false negatives",
        metavar="N",
    )
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
    seed: int = setting(
        42, help="seed of every random choice (order, dev split, initialisation, noise); 0 to 2**32-1"
    )
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
    precision: Precision = precision_setting()
    encode_batch_size: int = encode_batch_size_setting()
    freeze_backbone: bool = setting(
        False, help="train the MoE head only; texts still run through the frozen backbone"
    )
    head_only: bool = setting(
        False, help="train the MoE head only, on pooled embeddings computed once and cached"
    )
    document_index: str | None = setting(
        None,
        help="query-side heads with --head-only: read the documents' embeddings from this index of the "
        "backbone (any FAISS type, sharded too) instead of encoding the corpus",
        metavar="DIR",
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
        check_choices(self)
        if self.batch_size < 2:
            raise UsageError(f"batch_size must be >= 2 for in-batch negatives, got {self.batch_size}")
        if self.grad_cache_chunk_size < 0:
            raise UsageError(f"grad_cache_chunk_size must be >= 0, got {self.grad_cache_chunk_size}")
        if self.temperature <= 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        if self.epochs < 1:  # even with max_steps, which wins: provenance must not record the impossible
            raise UsageError(f"epochs must be >= 1, got {self.epochs}")
        check_seed("seed", self.seed)
        if self.max_train_pairs is not None and self.max_train_pairs < 2:  # in-batch negatives need two
            raise UsageError(f"max_train_pairs must be >= 2, got {self.max_train_pairs}")
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
        if self.negatives_source not in ("bm25", "dense") and not Path(self.negatives_source).is_file():
            raise UsageError(
                f"negatives_source (--negatives-source) {self.negatives_source!r} is neither bm25, "
                "dense nor an existing file of negatives (JSON: query id -> doc ids)"
            )
        if not 0 < self.dev_fraction < 1:
            raise UsageError(f"dev_fraction must be in (0, 1), got {self.dev_fraction}")
        if self.encode_batch_size < 1:
            raise UsageError(f"encode_batch_size must be >= 1, got {self.encode_batch_size}")
        self._check_memory_bounds()

    def _check_memory_bounds(self) -> None:
        """Refuse sizes whose memory no machine has, before anything is allocated."""
        check_at_most(
            "encode_batch_size",
            self.encode_batch_size,
            MAX_ENCODE_BATCH_SIZE,
            "activations grow with the texts of one forward pass",
        )
        check_at_most(
            "hard_negatives",
            self.hard_negatives,
            MAX_HARD_NEGATIVES,
            "each one adds batch_size documents to every step's forward pass",
        )
        check_at_most(
            "negatives_depth",
            self.negatives_depth,
            MAX_DOCUMENTS_TOP_K,
            "mining ranks this many documents for every training query",
        )
        scores = self.batch_size * self.batch_size * (1 + self.hard_negatives)
        if scores > MAX_IN_BATCH_SCORES:
            raise UsageError(
                f"batch_size {self.batch_size} with hard_negatives {self.hard_negatives} makes "
                f"{scores:,} in-batch scores per step (batch x batch x (1 + hard negatives)); at most "
                f"{MAX_IN_BATCH_SCORES:,} (1 GiB of float32, twice with gradients) fit: lower either"
            )
