"""The no-training baseline of a query-side head: the closed-form orthogonal map (Procrustes).

Given the pooled embeddings of training queries ``Q`` and of their relevant documents ``D`` (rows
L2-normalised when the model scores with cosine), the orthogonal ``W`` that minimises
``||Q W - D||_F`` is ``U V^T`` from the SVD ``Q^T D = U S V^T``. Applied to queries only, it rotates
them towards their documents without touching the index; being orthogonal, it keeps their norms,
so it can be applied to the raw pooled embedding before the model's own normalisation.
"""

from __future__ import annotations

import copy
import dataclasses

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig
from sbmoe.config.model import HeadConfig
from sbmoe.config.train import TrainConfig
from sbmoe.core.errors import UsageError
from sbmoe.data.beir import BeirCollection, positive_pairs, train_dev_split
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.model.adapters import LinearAdapter
from sbmoe.model.retriever import Retriever
from sbmoe.training.head_only import PooledTexts


def orthogonal_map(queries: np.ndarray, documents: np.ndarray) -> np.ndarray:
    """The orthogonal ``W`` (d, d) minimising ``||queries @ W - documents||``, rows paired."""
    if queries.shape != documents.shape or queries.ndim != 2 or not len(queries):
        raise UsageError(f"Procrustes needs paired (n, d) arrays, got {queries.shape} and {documents.shape}")
    left, _, right = np.linalg.svd(queries.astype(np.float64).T @ documents.astype(np.float64))
    return (left @ right).astype(np.float32)


def procrustes_model(
    backbone: Retriever,
    collection: BeirCollection,
    train_config: TrainConfig,
    encode: EncodeConfig | None = None,
    cache: EmbeddingCache | None = None,
) -> Retriever:
    """A query-side linear model whose map is the Procrustes solution on the training pairs.

    Fits on the pairs the trainer would train on (the training split less the dev queries that
    ``train_config`` holds out), from pooled embeddings (cached like head-only training's).

    Args:
        backbone: The zero-shot model (no head): its documents stay as they are.
        collection: Holds the training split.
        train_config: ``train_split`` and the dev carve (``dev_split``, ``dev_fraction``, ``seed``).
    """
    if backbone.head_module is not None:
        raise UsageError("Procrustes maps the bare backbone's queries: give a model without a head")
    train_qrels, _ = train_dev_split(
        collection,
        train_config.train_split,
        train_config.dev_split,
        train_config.dev_fraction,
        train_config.seed,
    )
    pairs = [
        (q, d) for q, d in positive_pairs(train_qrels) if q in collection.queries and d in collection.corpus
    ]
    if not pairs:
        raise UsageError(f"{collection.name}: no training pair to fit the Procrustes map on")
    pooled = PooledTexts(backbone, collection, cache, encode or EncodeConfig())
    queries = pooled.lookup("query", [q for q, _ in pairs]).numpy()
    documents = pooled.lookup("document", [d for _, d in pairs]).numpy()
    if backbone.config.similarity == "cosine":
        queries, documents = _unit_rows(queries), _unit_rows(documents)
    rotation = orthogonal_map(queries, documents)
    # y = x + A x with A = W^T - I is x W for a row x; on the raw pooled embedding (W keeps norms).
    config = dataclasses.replace(backbone.config, head="linear", head_side="query", num_experts=0)
    adapter = LinearAdapter(HeadConfig.from_model(config, len(rotation), normalize_input=False))
    with torch.no_grad():
        adapter.linear.weight.copy_(torch.from_numpy(rotation.T - np.eye(len(rotation), dtype=np.float32)))
    stages = [*backbone.encoder_stages(), adapter, *backbone.head_stages()]
    model = SentenceTransformer(
        modules=[copy.deepcopy(stage) for stage in stages], device=str(backbone.device)
    )
    model.max_seq_length = backbone.model.max_seq_length
    return Retriever(model, config)


def _unit_rows(matrix: np.ndarray) -> np.ndarray:
    return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)
