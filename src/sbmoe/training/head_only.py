"""Head-only training data: pooled backbone embeddings of a collection, computed once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.data.beir import BeirCollection
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import encode_pooled
from sbmoe.model.retriever import Retriever


class PooledTexts:
    """Pooled backbone embeddings of every query and document, computed once for head-only training.

    The whole corpus is encoded in corpus order, the order evaluation uses, so dev and test
    evaluation of the trained model find the same entries in the cache. ``documents`` replaces
    that encoding with embeddings the caller already holds (a query-side head's documents are the
    backbone's: an index of the backbone stores them, see
    :func:`~sbmoe.retrieval.stored_vectors.stored_document_vectors`), one row per corpus document.
    """

    def __init__(
        self,
        retriever: Retriever,
        collection: BeirCollection,
        cache: EmbeddingCache | None,
        encode: EncodeConfig,
        show_progress: bool = False,
        documents: np.ndarray | None = None,
    ) -> None:
        ids = {"query": list(collection.queries), "document": list(collection.corpus)}
        texts = {
            "query": list(collection.queries.values()),
            "document": [doc.full_text for doc in collection.corpus.values()],
        }
        if documents is not None and len(documents) != len(ids["document"]):
            raise ValueError(f"got {len(documents)} document embeddings for {len(ids['document'])} documents")
        self.rows = {kind: {item: row for row, item in enumerate(ids[kind])} for kind in ids}
        self.arrays = {
            kind: documents
            if kind == "document" and documents is not None
            else encode_pooled(
                retriever,
                texts[kind],
                kind,
                encode,
                options=JobOptions(show_progress=show_progress, cache=cache),
            )
            for kind in ids
        }

    def array(self, kind: str, ids: Sequence[str]) -> np.ndarray:
        """The pooled embeddings of ``ids`` as a float32 array, in order."""
        rows = [self.rows[kind][item] for item in ids]
        return np.ascontiguousarray(self.arrays[kind][rows], dtype=np.float32)

    def lookup(self, kind: str, ids: Sequence[str]) -> torch.Tensor:
        """The pooled embeddings of ``ids`` as a float32 tensor, in order."""
        return torch.from_numpy(self.array(kind, ids))
