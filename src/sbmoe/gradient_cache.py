"""Gradient caching (Gao et al., 2021): contrastive batches larger than memory would allow.

A first pass embeds the batch's texts a chunk at a time without keeping activations; the loss is
computed over all the embeddings (detached leaves) and back-propagated to them only; a second pass
re-embeds each chunk under the random state of its first pass (same dropout, same gate noise) and
back-propagates the kept embedding gradients into the parameters. The parameter gradients equal a
single pass over the whole batch (up to the padding of each chunk), while the activations of one
chunk at a time are held: memory grows with the chunk size, not the batch size, for about one more
forward pass of time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

DIFFERENTIABLE_KEYS = ("sentence_embedding", "router_logits")
KEPT_KEYS = (*DIFFERENTIABLE_KEYS, "expert_index")

Embed = Callable[[Sequence[str], str], dict[str, Any]]


@dataclass
class _RandomState:
    cpu: Tensor
    cuda: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> _RandomState:
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda)

    def restore(self, device: torch.device) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state(self.cuda, device)


@dataclass
class _Chunk:
    ids: list[str]
    kind: str
    random_state: _RandomState
    leaves: dict[str, Tensor]


class GradientCache:
    """Embeds texts chunk by chunk for one training step, then replays the chunks with gradients.

    Args:
        embed: ``embed(ids, kind)`` runs the model on the queries or documents ``ids`` and returns
            its feature dict (``sentence_embedding``, and ``router_logits`` / ``expert_index``
            where there is a MoE head).
        chunk_size: Texts per forward pass.
        device: Where the model computes (its random generator is replayed too).

    Use: ``out = cache.embed(ids, kind)`` for every group of texts, compute the loss from the
    outputs, ``loss.backward()``, then :meth:`backward` to carry the gradients into the model.
    """

    def __init__(self, embed: Embed, chunk_size: int, device: torch.device) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self._embed = embed
        self.chunk_size = chunk_size
        self.device = torch.device(device)
        self._chunks: list[_Chunk] = []

    def embed(self, ids: Sequence[str], kind: str) -> dict[str, Tensor]:
        """Embed ``ids`` without activations; outputs are leaves that collect the loss's gradients."""
        if not ids:
            raise ValueError(f"no {kind} texts to embed")
        parts = []
        for start in range(0, len(ids), self.chunk_size):
            chunk_ids = list(ids[start : start + self.chunk_size])
            random_state = _RandomState.capture(self.device)
            with torch.no_grad():
                features = self._embed(chunk_ids, kind)
            leaves = {
                key: features[key].detach().requires_grad_(key in DIFFERENTIABLE_KEYS)
                for key in KEPT_KEYS
                if key in features
            }
            self._chunks.append(_Chunk(chunk_ids, kind, random_state, leaves))
            parts.append(leaves)
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def backward(self) -> None:
        """Re-embed every chunk with gradients and back-propagate what the loss left on its outputs."""
        resume_state = _RandomState.capture(self.device)
        try:
            for chunk in self._chunks:
                chunk.random_state.restore(self.device)
                features = self._embed(chunk.ids, chunk.kind)
                outputs, gradients = [], []
                for key, leaf in chunk.leaves.items():
                    if leaf.grad is not None:
                        outputs.append(features[key])
                        gradients.append(leaf.grad)
                if outputs:
                    torch.autograd.backward(outputs, gradients)
        finally:
            resume_state.restore(self.device)  # the next step draws as if nothing was replayed
            self._chunks.clear()
