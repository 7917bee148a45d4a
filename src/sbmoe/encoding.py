"""Encode texts with a retriever: length-sorted batches, inference mode, optional bf16 autocast."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from tqdm.auto import tqdm

from sbmoe.errors import UsageError
from sbmoe.runtime import autocast, resolve_precision

if TYPE_CHECKING:
    from sbmoe.cache import EmbeddingCache
    from sbmoe.modeling import Retriever


def tokenize(retriever: Retriever, texts: Sequence[str], kind: str) -> dict[str, torch.Tensor]:
    """Tokenise one batch, padded to its longest text and truncated at the limit for ``kind``."""
    batch = retriever.tokenizer(
        retriever.prepare_texts(texts),
        padding=True,
        truncation=True,
        max_length=retriever.max_length(kind),
        return_tensors="pt",
    )
    return {key: value.to(retriever.device) for key, value in batch.items()}


def length_sorted_batches(
    retriever: Retriever, texts: Sequence[str], kind: str, batch_size: int
) -> Iterator[tuple[np.ndarray, dict[str, torch.Tensor]]]:
    """Yield (positions, padded batch) with texts grouped by token length, longest first.

    Sorting by length keeps padding (wasted compute) small; longest first surfaces an
    out-of-memory error at once instead of at the end.
    """
    encodings = retriever.tokenizer(
        retriever.prepare_texts(texts),
        truncation=True,
        max_length=retriever.max_length(kind),
        add_special_tokens=True,
    )
    lengths = np.fromiter((len(ids) for ids in encodings["input_ids"]), dtype=np.int64, count=len(texts))
    order = np.argsort(-lengths, kind="stable")
    for start in range(0, len(order), batch_size):
        positions = order[start : start + batch_size]
        features = [{key: encodings[key][i] for key in encodings} for i in positions]
        batch = retriever.tokenizer.pad(features, padding=True, return_tensors="pt")
        yield positions, {key: value.to(retriever.device) for key, value in batch.items()}


def run_stages(stages: Sequence[torch.nn.Module], features: dict) -> dict:
    """Pass a feature dict through pipeline stages."""
    for stage in stages:
        features = stage(features)
    return features


def encode_texts(
    retriever: Retriever,
    texts: Sequence[str],
    kind: str = "document",
    batch_size: int = 64,
    precision: str = "auto",
    pooled_only: bool = False,
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
) -> np.ndarray:
    """Encode ``texts`` into a float32 array (len(texts), d), in the input order.

    Args:
        retriever: The model.
        texts: Queries or documents (documents as "title text").
        kind: ``query`` or ``document``: selects the token limit.
        batch_size: Texts per forward pass.
        precision: ``fp32``, ``bf16`` (autocast) or ``auto``.
        pooled_only: Stop after pooling (the input of the MoE head); see :func:`apply_head_stages`.
        show_progress: Show a progress bar.
        cache: Reuse (or store) the pooled embeddings; only the head then runs on a hit.
    """
    if kind not in ("query", "document"):
        raise UsageError(f"kind must be 'query' or 'document', got {kind!r}")
    if not texts:
        dim = retriever.model.get_sentence_embedding_dimension()
        return np.zeros((0, dim), dtype=np.float32)
    resolved = resolve_precision(precision, retriever.device)
    if cache is None:
        stages = retriever.encoder_stages() if pooled_only else list(retriever.model.children())
        return _run_batches(retriever, stages, texts, kind, batch_size, resolved, show_progress)
    key = cache.key(retriever, texts, kind, resolved)
    pooled = cache.get(key, len(texts))
    if pooled is None:
        pooled = _run_batches(
            retriever, retriever.encoder_stages(), texts, kind, batch_size, resolved, show_progress
        )
        cache.put(key, pooled)
    return np.array(pooled, dtype=np.float32) if pooled_only else apply_head_stages(retriever, pooled)


def _run_batches(
    retriever: Retriever,
    stages: Sequence[torch.nn.Module],
    texts: Sequence[str],
    kind: str,
    batch_size: int,
    precision: str,
    show_progress: bool,
) -> np.ndarray:
    output: np.ndarray | None = None
    was_training = retriever.model.training
    retriever.model.eval()
    bar = tqdm(total=len(texts), desc=f"encode {kind}s", unit="text", disable=not show_progress)
    try:
        with torch.inference_mode(), autocast(precision, retriever.device):
            run = _inference_runner(retriever, stages, precision)
            for positions, batch in length_sorted_batches(retriever, texts, kind, batch_size):
                embeddings = run(batch)["sentence_embedding"].float().cpu().numpy()
                if output is None:
                    output = np.empty((len(texts), embeddings.shape[1]), dtype=np.float32)
                output[positions] = embeddings
                bar.update(len(positions))
    finally:
        bar.close()
        retriever.model.train(was_training)
    assert output is not None
    return output


def _inference_runner(
    retriever: Retriever, stages: Sequence[torch.nn.Module], precision: str
) -> Callable[[dict], dict]:
    """The stages as one function; under bf16 the encoder runs on bf16 copies of its weights.

    Autocast alone converts every weight matrix to bf16 again at every call; converting once per
    encoding spares that (and keeps layer norms and activations in bf16 too). The model's own
    weights stay float32, so training is unaffected. The MoE head still runs under autocast.
    """
    if precision != "bf16":
        return functools.partial(run_stages, stages)
    encoder = {id(stage) for stage in retriever.encoder_stages()}
    weights = [_bf16_state(stage) if id(stage) in encoder else None for stage in stages]

    def run(features: dict) -> dict:
        for stage, state in zip(stages, weights, strict=True):
            features = torch.func.functional_call(stage, state, (features,)) if state else stage(features)
        return features

    return run


def _bf16_state(stage: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors = itertools.chain(stage.named_parameters(), stage.named_buffers())
    return {
        name: tensor.to(torch.bfloat16) if tensor.is_floating_point() else tensor for name, tensor in tensors
    }


def apply_head_stages(
    retriever: Retriever, pooled: np.ndarray, expert_pooling: str | None = None, batch_size: int = 4096
) -> np.ndarray:
    """Apply the stages after pooling (MoE head, normalisation) to pooled embeddings.

    Lets one backbone pass serve several inference rules (e.g. ``top1`` and ``all``) of one model.
    Runs in float32: the head is tiny, and this keeps the result independent of the backbone's
    precision.
    """
    head = retriever.head
    previous = head.expert_pooling if head is not None else None
    if head is not None and expert_pooling is not None:
        head.expert_pooling = expert_pooling
    stages = retriever.head_stages()
    was_training = retriever.model.training
    retriever.model.eval()
    try:
        chunks = []
        with torch.inference_mode():
            for start in range(0, len(pooled), batch_size):
                x = torch.from_numpy(np.array(pooled[start : start + batch_size], dtype=np.float32)).to(
                    retriever.device
                )
                chunks.append(
                    run_stages(stages, {"sentence_embedding": x})["sentence_embedding"].cpu().numpy()
                )
    finally:
        if head is not None:
            head.expert_pooling = previous
        retriever.model.train(was_training)
    return np.concatenate(chunks).astype(np.float32) if chunks else pooled.astype(np.float32)
