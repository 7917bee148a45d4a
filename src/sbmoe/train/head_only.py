"""Head-only training data: pooled backbone embeddings of a collection, computed once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sbmoe.config.jobs import EncodeConfig
from sbmoe.data.beir import BeirCollection
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.retriever import Retriever


class PooledTexts:
    """Pooled backbone embeddings of every query and document, computed once for head-only training.

    The whole corpus is encoded in corpus order, the order evaluation uses, so dev and test
    evaluation of the trained model find the same entries in the cache.
    """

    def __init__(
        self,
        retriever: Retriever,
        collection: BeirCollection,
        cache: EmbeddingCache | None,
        encode: EncodeConfig,
        show_progress: bool = False,
    ) -> None:
        ids = {"query": list(collection.queries), "document": list(collection.corpus)}
        texts = {
            "query": list(collection.queries.values()),
            "document": [doc.full_text for doc in collection.corpus.values()],
        }
        self.rows = {kind: {item: row for row, item in enumerate(ids[kind])} for kind in ids}
        self.arrays = {
            kind: encode_texts(
                retriever,
                texts[kind],
                kind,
                encode,
                pooled_only=True,
                show_progress=show_progress,
                cache=cache,
            )
            for kind in ids
        }

    def lookup(self, kind: str, ids: Sequence[str]) -> torch.Tensor:
        """The pooled embeddings of ``ids`` as a float32 tensor, in order."""
        rows = [self.rows[kind][item] for item in ids]
        return torch.from_numpy(np.ascontiguousarray(self.arrays[kind][rows], dtype=np.float32))
