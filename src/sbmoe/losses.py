"""Training losses: in-batch contrastive loss and the MoE router's auxiliary losses.

The contrastive loss divides scores by a temperature; ``scale = 1 / temperature`` is the same knob
under the name sentence-transformers' MultipleNegativesRankingLoss uses (scale 20 = temperature 0.05).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


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
