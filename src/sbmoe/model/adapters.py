"""The linear residual adapter: a capacity control for the MoE head, as a sentence-transformers module.

``y = x + W x + b`` with one ``Linear(d, d)`` (``d * d + d`` parameters): no experts, no gate, no
routing. It asks whether a gain of SB-MoE needs a mixture at all, or only a trainable map on top of
the pooled embedding. ``W`` and ``b`` start at zero, so the untrained adapter is the identity and
training starts from the backbone's zero-shot embeddings. Like :class:`~sbmoe.model.moe_head.MoEHead`, it
reads the L2-normalised embedding when the model scores with cosine similarity (``normalize_input``).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from sbmoe.config.model import HeadConfig
from sbmoe.model.head import Head


class LinearAdapter(Head):
    """A zero-initialised residual ``Linear(d, d)`` on the pooled embedding.

    Reads ``features["sentence_embedding"]`` and replaces it with ``x + W x + b``; it leaves no router
    features behind.

    Args:
        config: Its dimension d, whether it normalises its input first (set for cosine-similarity
            models, as for the MoE head) and its side (``both``, or ``query``: documents keep the
            backbone's embedding).
    """

    kind = "linear"

    def __init__(self, config: HeadConfig) -> None:
        super().__init__(config)
        self.linear = nn.Linear(config.embedding_dimension, config.embedding_dimension)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def delta(self, x: Tensor, features: dict[str, Any]) -> Tensor:
        return self.linear(x)
