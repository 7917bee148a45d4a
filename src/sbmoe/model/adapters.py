"""The linear residual adapter: a capacity control for the MoE head, as a sentence-transformers module.

``y = x + W x + b`` with one ``Linear(d, d)`` (``d * d + d`` parameters): no experts, no gate, no
routing. It asks whether a gain of SB-MoE needs a mixture at all, or only a trainable map on top of
the pooled embedding. ``W`` and ``b`` start at zero, so the untrained adapter is the identity and
training starts from the backbone's zero-shot embeddings. Like :class:`~sbmoe.model.moe_head.MoEHead`, it
reads the L2-normalised embedding when the model scores with cosine similarity (``normalize_input``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch.nn.functional as F
from torch import nn

from sbmoe.model.moe_head import NORMALIZE_EPS, SavedModule


class LinearAdapter(SavedModule):
    """A zero-initialised residual ``Linear(d, d)`` on the pooled embedding.

    Reads ``features["sentence_embedding"]`` and replaces it with ``x + W x + b``; it leaves no router
    features behind.

    Args:
        embedding_dimension: Dimension d of the pooled embedding.
        normalize_input: L2-normalise the pooled embedding first (set for cosine-similarity models,
            as for the MoE head).
    """

    config_keys: ClassVar[list[str]] = ["embedding_dimension", "normalize_input"]

    def __init__(self, embedding_dimension: int, normalize_input: bool = False) -> None:
        super().__init__()
        self.embedding_dimension = embedding_dimension
        self.normalize_input = normalize_input
        self.linear = nn.Linear(embedding_dimension, embedding_dimension)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, features: dict[str, Any], **kwargs) -> dict[str, Any]:
        x = features["sentence_embedding"]
        if self.normalize_input:
            x = F.normalize(x, p=2, dim=-1, eps=NORMALIZE_EPS)
        features["sentence_embedding"] = x + self.linear(x)
        return features
