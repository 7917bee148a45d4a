"""Gradient caching (Gao et al., 2021) as a loss wrapper: contrastive batches larger than memory allows.

``GradientCache(loss, chunk_size)(batch)`` returns the loss of ``loss(batch)``, computed another way,
as sentence-transformers' CachedMultipleNegativesRankingLoss does: a first pass embeds the batch's
texts a chunk at a time without keeping activations; the loss is computed over all the embeddings
(detached leaves) and back-propagated to them only; the returned loss carries a hook, so that its
``backward()`` re-embeds each chunk under the random state and autocast of its first pass (same
dropout, same gate noise, same numerics) and back-propagates the kept embedding gradients into the
parameters. The parameter gradients equal a single pass over the whole batch (up to the padding of
each chunk), while the activations of one chunk at a time are held: memory grows with the chunk
size, not the batch size, for about one more forward pass of time.

Under DDP the replays of all chunks but the last run in ``no_sync``: gradients accumulate locally
and are averaged once, by the last backward.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from sbmoe.core.distributed import no_sync
from sbmoe.training.batching import TrainingBatch
from sbmoe.training.losses import Features, LossOutput


class EmbeddingLoss(Protocol):
    """What :class:`GradientCache` wraps (e.g. :class:`~sbmoe.training.losses.RetrievalLoss`)."""

    model: nn.Module

    def from_features(self, features: dict[str, Features], batch: TrainingBatch) -> LossOutput: ...


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
    kind: str
    ids: list[str]
    random_state: _RandomState
    autocast: tuple[bool, torch.dtype]
    leaves: Features

    def autocast_context(self, device: torch.device) -> torch.autocast:
        enabled, dtype = self.autocast
        return torch.autocast(device.type, dtype=dtype, enabled=enabled)


class GradientCache(nn.Module):
    """Wraps a loss so that its model embeds ``chunk_size`` texts per forward pass.

    Args:
        loss: The loss to compute; its ``model`` embeds ``{kind: ids}`` and is replayed chunk by chunk.
        chunk_size: Texts per forward pass.
        device: Where the model computes (its random generator is replayed too).
    """

    def __init__(self, loss: EmbeddingLoss, chunk_size: int, device: torch.device | str = "cpu") -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        super().__init__()
        self.loss = loss
        self.chunk_size = chunk_size
        self.device = torch.device(device)

    def forward(self, batch: TrainingBatch) -> LossOutput:
        chunks: list[_Chunk] = []
        features = {kind: self._embed(kind, ids, chunks) for kind, ids in batch.local_ids().items()}
        output = self.loss.from_features(features, batch)
        if not torch.is_grad_enabled():
            return output
        output.loss.backward()  # to the embeddings only: they are leaves
        loss = output.loss.detach().requires_grad_()
        loss.register_hook(functools.partial(self._replay, chunks=chunks))
        return dataclasses.replace(output, loss=loss)

    def _embed(self, kind: str, ids: list[str], chunks: list[_Chunk]) -> Features:
        """Embed ``ids`` without activations; the outputs are leaves that collect the loss's gradients."""
        if not ids:
            raise ValueError(f"no {kind} texts to embed")
        parts = []
        for start in range(0, len(ids), self.chunk_size):
            chunk_ids = ids[start : start + self.chunk_size]
            random_state = _RandomState.capture(self.device)
            autocast = (
                torch.is_autocast_enabled(self.device.type),
                torch.get_autocast_dtype(self.device.type),
            )
            with torch.no_grad():
                features = self.loss.model({kind: chunk_ids})[kind]
            leaves = {
                key: value.detach().requires_grad_(value.is_floating_point())
                for key, value in features.items()
            }
            chunks.append(_Chunk(kind, chunk_ids, random_state, autocast, leaves))
            parts.append(leaves)
        return {key: torch.cat([part[key] for part in parts]) for key in parts[0]}

    def _replay(self, grad: Tensor, chunks: list[_Chunk]) -> None:
        """Re-embed every chunk with gradients and back-propagate what the loss left on its outputs."""
        model = self.loss.model
        resume_state = _RandomState.capture(self.device)
        try:
            for position, chunk in enumerate(chunks):
                last = position == len(chunks) - 1
                # A hook runs inside backward, where gradients are off: turn them back on.
                with torch.enable_grad(), contextlib.nullcontext() if last else no_sync(model):
                    chunk.random_state.restore(self.device)
                    with chunk.autocast_context(self.device):
                        features = model({chunk.kind: chunk.ids})[chunk.kind]
                    outputs, gradients = [], []
                    for key, leaf in chunk.leaves.items():
                        if leaf.grad is not None:
                            outputs.append(features[key])
                            gradients.append(leaf.grad * grad)
                    if outputs:
                        torch.autograd.backward(outputs, gradients)
        finally:
            resume_state.restore(self.device)  # the next step draws as if nothing was replayed
