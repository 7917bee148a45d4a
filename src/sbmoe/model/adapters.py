"""The linear residual adapter: a capacity control for the MoE head, as a sentence-transformers module.

``y = x + W x + b`` with one ``Linear(d, d)`` (``d * d + d`` parameters): no experts, no gate, no
routing. It asks whether a gain of SB-MoE needs a mixture at all, or only a trainable map on top of
the pooled embedding. ``W`` and ``b`` start at zero, so the untrained adapter is the identity and
training starts from the backbone's zero-shot embeddings. Like :class:`~sbmoe.model.moe_head.MoEHead`, it
reads the L2-normalised embedding when the model scores with cosine similarity (``normalize_input``).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from sbmoe.model.head import Head


class LinearAdapter(Head):
    """A zero-initialised residual ``Linear(d, d)`` on the pooled embedding.

    Reads ``features["sentence_embedding"]`` and replaces it with ``x + W x + b``; it leaves no router
    features behind.

    Args:
        embedding_dimension: Dimension d of the pooled embedding.
        normalize_input: L2-normalise the pooled embedding first (set for cosine-similarity models,
            as for the MoE head).
        side: ``both`` (queries and documents) or ``query`` (documents keep the backbone's embedding).
    """

    config_keys: ClassVar[list[str]] = ["embedding_dimension", "normalize_input", "side"]

    def __init__(self, embedding_dimension: int, normalize_input: bool = False, side: str = "both") -> None:
        super().__init__(normalize_input, side)
        self.embedding_dimension = embedding_dimension
        self.linear = nn.Linear(embedding_dimension, embedding_dimension)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def delta(self, x: Tensor, features: dict[str, Any]) -> Tensor:
        return self.linear(x)
