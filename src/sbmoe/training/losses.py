"""Training losses: modules that own their mechanics, over the functional losses they compute.

:class:`InBatchContrastiveLoss` owns its temperature, false-negative masking, the symmetric
direction and the cross-process gather; :class:`RouterLoss` the MoE router's auxiliary losses and
their gather; :class:`RetrievalLoss` runs the model on a batch and combines the two. The trainer
calls one loss object per step (:class:`~sbmoe.training.gradient_cache.GradientCache` wraps it for gradient
caching) and back-propagates what it returns.

The contrastive loss divides scores by a temperature; ``scale = 1 / temperature`` is the same knob
under the name sentence-transformers' MultipleNegativesRankingLoss uses (scale 20 = temperature 0.05).

Under data parallelism each process's loss is its share of the whole batch's mean, so DDP's average
of the processes' gradients is the gradient of one process's loss on the whole batch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbmoe.core.distributed import DistributedContext, all_gather_tensor, all_gather_with_grad
from sbmoe.training.batching import TrainingBatch, false_negative_mask

if TYPE_CHECKING:
    from sbmoe.config.train import TrainConfig
    from sbmoe.model.moe_head import MoEHead

Features = dict[str, Tensor]


def in_batch_contrastive_loss(
    query_embeddings: Tensor,
    document_embeddings: Tensor,
    temperature: float,
    labels: Tensor | None = None,
    false_negative_mask: Tensor | None = None,
) -> Tensor:
    """Cross-entropy over query-by-document scores with the other documents as negatives.

    Args:
        query_embeddings: (B, d).
        document_embeddings: (M, d), M >= B; the positive of query i is document ``labels[i]``.
        temperature: Scores are divided by it.
        labels: (B,) positive positions; defaults to the diagonal ``0..B-1``.
        false_negative_mask: (B, M) booleans, True where a document must not count as a negative
            for that query (it is relevant too). The positive itself is never masked.
    """
    scores = (query_embeddings @ document_embeddings.T).float() / temperature
    if labels is None:
        labels = torch.arange(len(query_embeddings), device=scores.device)
    if false_negative_mask is not None:
        keep_positive = F.one_hot(labels, scores.shape[1]).bool()
        scores = scores.masked_fill(false_negative_mask & ~keep_positive, float("-inf"))
    return F.cross_entropy(scores, labels)


def load_balancing_loss(router_logits: Tensor, selected_expert: Tensor) -> Tensor:
    """Switch-Transformer load balancing: ``N * sum_m f_m * P_m`` (1.0 when routing is uniform).

    Args:
        router_logits: (B, N) clean gate logits.
        selected_expert: (B,) the top-1 expert each text was routed to.
    """
    num_experts = router_logits.shape[-1]
    probabilities = torch.softmax(router_logits.float(), dim=-1)
    fraction_routed = F.one_hot(selected_expert, num_experts).float().mean(dim=0)
    mean_probability = probabilities.mean(dim=0)
    return num_experts * torch.sum(fraction_routed * mean_probability)


def router_z_loss(router_logits: Tensor) -> Tensor:
    """ST-MoE router z-loss: mean squared log-partition of the gate logits (keeps them small)."""
    return torch.logsumexp(router_logits.float(), dim=-1).pow(2).mean()


@dataclass
class LossOutput:
    """What a loss returns for one step.

    Attributes:
        loss: The tensor to back-propagate (this process's share under data parallelism).
        terms: Logged values of the whole batch (``contrastive``, router terms, ``loss``).
        features: This process's model outputs by kind (``query``, ``document``), for statistics.
    """

    loss: Tensor
    terms: dict[str, float]
    features: dict[str, Features] = field(default_factory=dict)


def _process_share(loss: Tensor, batch: TrainingBatch) -> Tensor:
    """Scale a mean over this process's queries to its share of the mean over the whole batch.

    DDP averages gradients over processes; with this scaling the average is the gradient of the
    whole batch's mean, whatever the slice sizes.
    """
    local = batch.query_sizes[batch.rank]
    return loss * (local * len(batch.queries) / batch.size)


class InBatchContrastiveLoss(nn.Module):
    """Cross-entropy of each query against every document of the batch, its positive the target.

    Documents of all processes are gathered with their gradients, so each query meets the whole
    global batch's documents (positives and hard negatives) as negatives.

    Args:
        temperature: Scores are divided by it (``scale = 1 / temperature``).
        qrels: Judgements for false-negative masking: a batch document judged relevant to a query is
            no negative for it. ``None`` masks nothing.
        symmetric: Average with the document -> query direction (each positive against every
            query of the batch).
        context: The data-parallel job (``None``: one process).
    """

    def __init__(
        self,
        temperature: float,
        qrels: Mapping[str, Mapping[str, int]] | None = None,
        symmetric: bool = False,
        context: DistributedContext | None = None,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.qrels = qrels
        self.symmetric = symmetric
        self.context = context or DistributedContext()

    def _mask(self, query_ids: list[str], doc_ids: list[str], device: torch.device) -> Tensor | None:
        if self.qrels is None:
            return None
        return false_negative_mask(query_ids, doc_ids, self.qrels).to(device)

    def forward(self, queries: Tensor, documents: Tensor, batch: TrainingBatch) -> Tensor:
        """This process's share of the batch loss.

        Args:
            queries: Embeddings of this process's queries, ``batch.queries[rank]``.
            documents: Embeddings of this process's documents, ``batch.documents[rank]``.
            batch: The layout of the whole batch.
        """
        rank, context = batch.rank, self.context
        all_documents = all_gather_with_grad(documents.float(), batch.document_sizes, context)
        query_ids = batch.queries[rank]
        mask = self._mask(query_ids, [d for docs in batch.documents for d in docs], queries.device)
        start = sum(batch.document_sizes[:rank])
        labels = torch.arange(start, start + len(query_ids), device=queries.device)
        loss = in_batch_contrastive_loss(queries.float(), all_documents, self.temperature, labels, mask)
        if self.symmetric:
            all_queries = all_gather_with_grad(queries.float(), batch.query_sizes, context)
            all_query_ids = [q for ids in batch.queries for q in ids]
            mask = self._mask(all_query_ids, batch.positives(rank), queries.device)
            start = sum(batch.query_sizes[:rank])
            labels = torch.arange(start, start + len(query_ids), device=queries.device)
            reverse = in_batch_contrastive_loss(
                documents[: len(query_ids)].float(),
                all_queries,
                self.temperature,
                labels,
                mask.T if mask is not None else None,
            )
            loss = (loss + reverse) / 2
        return _process_share(loss, batch)


class RouterLoss(nn.Module):
    """The MoE router's auxiliary losses on the whole batch: load balancing and z-loss, weighted.

    Router statistics are batch means, so every process gathers every process's router logits
    (with gradients) and selections, and computes the same value.

    Args:
        load_balancing_coef: Weight of :func:`load_balancing_loss` (0 leaves it out).
        z_loss_coef: Weight of :func:`router_z_loss` (0 leaves it out).
        context: The data-parallel job (``None``: one process).
    """

    def __init__(
        self, load_balancing_coef: float, z_loss_coef: float, context: DistributedContext | None = None
    ) -> None:
        super().__init__()
        self.load_balancing_coef = load_balancing_coef
        self.z_loss_coef = z_loss_coef
        self.context = context or DistributedContext()

    @classmethod
    def for_head(
        cls, head: MoEHead | None, config: TrainConfig, context: DistributedContext | None = None
    ) -> RouterLoss | None:
        """The router loss ``config`` asks for, or ``None``: only a learned gate has one to learn from."""
        coefs = (config.load_balancing_coef, config.router_z_loss_coef)
        if head is None or head.gating != "learned" or not any(c > 0 for c in coefs):
            return None
        return cls(*coefs, context)

    def forward(
        self, queries: Features, documents: Features, batch: TrainingBatch
    ) -> tuple[Tensor, dict[str, float]]:
        """The weighted sum and the unweighted terms (``load_balancing``, ``router_z``)."""
        # Documents pass no head under a query-side head: then only queries are routed.
        routed = [
            (features, sizes)
            for features, sizes in ((queries, batch.query_sizes), (documents, batch.document_sizes))
            if "router_logits" in features
        ]
        sizes = [sum(per_kind) for per_kind in zip(*(kind_sizes for _, kind_sizes in routed), strict=True)]
        logits = torch.cat([features["router_logits"] for features, _ in routed]).float()
        logits = all_gather_with_grad(logits, sizes, self.context)
        chosen = torch.cat([features["expert_index"] for features, _ in routed])
        chosen = all_gather_tensor(chosen, sizes, self.context)
        loss, terms = logits.new_zeros(()), {}
        if self.load_balancing_coef > 0:
            balance = load_balancing_loss(logits, chosen)
            loss = loss + self.load_balancing_coef * balance
            terms["load_balancing"] = balance.item()
        if self.z_loss_coef > 0:
            z_loss = router_z_loss(logits)
            loss = loss + self.z_loss_coef * z_loss
            terms["router_z"] = z_loss.item()
        return loss, terms


class RetrievalLoss(nn.Module):
    """The training loss of a retriever: contrastive, plus the router's losses when given.

    Like a sentence-transformers loss it holds the model: ``loss(batch)`` embeds this process's
    queries and documents and returns the loss and its logged terms.

    Args:
        model: ``model({"query": ids, "document": ids})`` -> features by kind
            (see :class:`~sbmoe.training.trainable.TrainableEncoder`), possibly wrapped in DDP.
        contrastive: The in-batch loss.
        router: The router's auxiliary losses (``None``: none).
        context: The data-parallel job (``None``: one process).
    """

    def __init__(
        self,
        model: nn.Module,
        contrastive: InBatchContrastiveLoss,
        router: RouterLoss | None = None,
        context: DistributedContext | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.contrastive = contrastive
        self.router = router
        self.context = context or DistributedContext()

    def forward(self, batch: TrainingBatch) -> LossOutput:
        return self.from_features(self.model(batch.local_ids()), batch)

    def from_features(self, features: dict[str, Features], batch: TrainingBatch) -> LossOutput:
        """The loss of given model outputs (by kind) for ``batch``."""
        queries, documents = features["query"], features["document"]
        # Scores and router statistics in float32, even when the model ran under bf16 autocast.
        with torch.autocast(queries["sentence_embedding"].device.type, enabled=False):
            loss = self.contrastive(queries["sentence_embedding"], documents["sentence_embedding"], batch)
            terms = {"contrastive": loss.item()}
            if self.router is not None:
                router_loss, router_terms = self.router(queries, documents, batch)
                loss = loss + router_loss
                terms.update(router_terms)
        terms["loss"] = loss.item()
        if self.context.is_distributed:
            # The whole batch's values: the contrastive shares add up; router terms are the same
            # on every process.
            total = self.context.all_reduce_sum([terms["contrastive"], terms["loss"]])
            terms["contrastive"], terms["loss"] = (value / self.context.world_size for value in total)
        return LossOutput(loss, terms, features)
