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
# The untrained controls of the study (sbmoe.study.controls), a grid variant's `control:`.
CONTROLS = ("document-prior", "zero-shot+prior", "procrustes")
# Controls made of the evaluated collection's own judgements: nothing to carry to another collection
# (procrustes, a query map fitted on the training pairs, transfers like a trained model).
PRIOR_CONTROLS = ("document-prior", "zero-shot+prior")

# What --backend auto with --precision auto picks, by whether this machine computes bf16 fast (GPUs
# with bf16; CPUs with AMX or AVX512-BF16). sbmoe.core.runtime.resolve_inference follows this table
# and the --backend help is written from it, so the two cannot disagree. int8 (onnx) is never
# picked: it quantises with one scale per batch, so an embedding would depend on its batch.
AUTO_INFERENCE: dict[bool, tuple[str, str, str]] = {
    True: ("torch", "bf16", "on GPUs and CPUs that compute bf16 fast (AMX, AVX512-BF16)"),
    False: ("torch", "fp32", "elsewhere"),
}


# What auto/auto picks for one text per pass (a served query) on a CPU where ONNX Runtime is
# installed (sbmoe.core.runtime.resolve_one_text_inference); elsewhere, AUTO_INFERENCE.
ONE_TEXT_AUTO_INFERENCE: tuple[str, str] = ("onnx", "fp32")


def describe_auto_inference() -> str:
    """What ``auto`` picks, in words, from :data:`AUTO_INFERENCE` and :data:`ONE_TEXT_AUTO_INFERENCE`
    (for help texts)."""
    picks = "; ".join(f"{backend} {precision} {when}" for backend, precision, when in AUTO_INFERENCE.values())
    one_text = " ".join(ONE_TEXT_AUTO_INFERENCE)
    return (
        f"auto: {picks} (int8 onnx only when asked for: its embeddings depend on the batch); "
        f"serve, encoding each query alone: {one_text} on a CPU where onnxruntime is installed"
    )
