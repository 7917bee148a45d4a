"""The named choices of settings, in one place (standard library only, so ``--help`` stays fast).

Configs, the runtime and the index all check values against these tuples; nothing else spells them.
"""

from __future__ import annotations

from typing import Literal

# The paper's metrics (Sokli et al.), as ranx names them.
PAPER_METRICS = ("ndcg@10", "recall@100", "mrr@10", "map@100", "precision@1", "ndcg@3")

GatingVariant = Literal["paper", "learned", "random"]
ExpertPooling = Literal["top1", "topk", "all"]
Similarity = Literal["auto", "cosine", "dot"]
Precision = Literal["auto", "fp32", "bf16"]

GATING_VARIANTS = ("paper", "learned", "random")
HEADS = ("moe", "linear")
# Where the head applies: both towers (the paper) or queries only (the index stays the backbone's).
HEAD_SIDES = ("both", "query")
EXPERT_POOLINGS = ("top1", "topk", "all")
SIMILARITIES = ("auto", "cosine", "dot")
POOLINGS = ("mean", "cls", "max")
SCHEDULERS = ("constant", "linear", "cosine")
CHECKPOINT_SELECTIONS = ("best", "last")
REPORT_TO = ("none", "tensorboard")
# Training precisions; inference adds int8 (onnx backend only).
PRECISIONS = ("auto", "fp32", "bf16")
INFERENCE_PRECISIONS = (*PRECISIONS, "int8")
BACKENDS = ("auto", "torch", "onnx")
INDEX_TYPES = ("flat", "hnsw", "ivf")
EMBEDDING_DTYPES = ("float32", "float16")
