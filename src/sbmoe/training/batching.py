"""Training batches: which pairs go together, and which batch documents are no negatives."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

BatchOrder = Callable[[int, int], list[list[int]]]
"""(epoch, number of pairs) -> global batches of pair positions (split among processes when distributed)."""


def shuffled_batches(seed: int, batch_size: int) -> BatchOrder:
    """A seeded shuffle per epoch, cut into batches; a last batch of one pair is dropped."""

    def order(epoch: int, num_pairs: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(num_pairs, generator=generator).tolist()
        batches = [permutation[i : i + batch_size] for i in range(0, num_pairs, batch_size)]
        return [b for b in batches if len(b) >= 2]

    return order


def length_grouped_batches(seed: int, batch_size: int, lengths: Sequence[int], group: int = 50) -> BatchOrder:
    """Like :func:`shuffled_batches`, but each batch holds pairs of similar document length.

    The shuffled pairs are cut into windows of ``group`` batches; each window is sorted by length
    before it is cut into batches, and the batch order is shuffled again. Padding (wasted compute)
    shrinks while every epoch still sees the pairs in a new, seeded order.
    """

    def order(epoch: int, num_pairs: int) -> list[list[int]]:
        if num_pairs != len(lengths):
            raise ValueError(f"length_grouped_batches knows {len(lengths)} pairs, asked for {num_pairs}")
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        permutation = torch.randperm(num_pairs, generator=generator).tolist()
        window = batch_size * group
        batches = []
        for start in range(0, num_pairs, window):
            chunk = sorted(permutation[start : start + window], key=lambda i: lengths[i])
            batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[i] for i in shuffled if len(batches[i]) >= 2]

    return order


@dataclass(frozen=True)
class TrainingBatch:
    """One step's global batch as the processes split it.

    Attributes:
        queries: ``queries[r]``: the query ids of process ``r`` (a contiguous slice of the batch).
        documents: ``documents[r]``: the positives of those queries, in the same order, followed by
            their hard negatives.
        rank: This process.
    """

    queries: list[list[str]]
    documents: list[list[str]]
    rank: int = 0

    @property
    def size(self) -> int:
        """Pairs in the whole batch (all processes)."""
        return sum(self.query_sizes)

    @property
    def query_sizes(self) -> list[int]:
        return [len(ids) for ids in self.queries]

    @property
    def document_sizes(self) -> list[int]:
        return [len(ids) for ids in self.documents]

    def local_ids(self) -> dict[str, list[str]]:
        """This process's texts to embed, by kind (``query``, ``document``)."""
        return {"query": self.queries[self.rank], "document": self.documents[self.rank]}

    def positives(self, rank: int) -> list[str]:
        """The positive documents of process ``rank``'s queries, in query order."""
        return self.documents[rank][: len(self.queries[rank])]


def false_negative_mask(
    query_ids: Sequence[str], doc_ids: Sequence[str], qrels: dict[str, dict[str, int]]
) -> torch.Tensor:
    """(B, M) True where document j is also relevant to query i (so it is no negative for it)."""
    return torch.tensor(
        [[qrels.get(q, {}).get(d, 0) > 0 for d in doc_ids] for q in query_ids], dtype=torch.bool
    )
