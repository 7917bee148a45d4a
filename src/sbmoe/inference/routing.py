"""How an MoE head routes texts: expert usage fractions and routing entropy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch

from sbmoe.inference.encoding import apply_head_stages

if TYPE_CHECKING:
    from sbmoe.model.retriever import Retriever


def routing_statistics(retriever: Retriever, pooled: np.ndarray, batch_size: int = 4096) -> dict[str, Any]:
    """Usage of each expert (share of texts whose top-1 expert it is) and routing entropies.

    Args:
        retriever: A model with an MoE head.
        pooled: Pooled embeddings (the head's input), e.g. from
            :func:`~sbmoe.inference.encoding.encode_pooled`.

    Returns:
        ``usage`` (N fractions summing to 1), ``entropy`` of the mean routing distribution
        (``-sum_m P_m log P_m``; ``log N`` when experts are used evenly), ``mean_text_entropy`` (how
        spread a single text's gate is), ``max_share`` and ``count``.
    """
    head = retriever.head
    if head is None:
        raise ValueError("routing statistics need a model with an MoE head")
    index, probs = route(retriever, pooled, batch_size)
    usage = torch.bincount(index, minlength=head.num_experts).double() / max(len(index), 1)
    mean_probs = probs.double().mean(dim=0)
    per_text = -(probs.double() * probs.double().clamp_min(1e-12).log()).sum(dim=-1)
    return {
        "usage": usage.tolist(),
        "entropy": float(-(mean_probs * mean_probs.clamp_min(1e-12).log()).sum()),
        "max_entropy": float(np.log(head.num_experts)),
        "mean_text_entropy": float(per_text.mean()),
        "max_share": float(usage.max()),
        "count": len(index),
    }


def route(
    retriever: Retriever, pooled: np.ndarray, batch_size: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the MoE head sends each text at inference: its top-1 expert and its gate probabilities.

    Args:
        retriever: A model with an MoE head.
        pooled: Pooled embeddings (the head's input), ``(n, d)``.

    Returns:
        The top-1 expert of each text ``(n,)`` (the clean gate's argmax) and the softmax of the
        clean gate logits ``(n, experts)``, both on the CPU.
    """
    head = retriever.head
    if head is None:
        raise ValueError("routing needs a model with an MoE head")
    chosen, probabilities = [], []

    def record(_module: torch.nn.Module, _inputs: Any, out: dict[str, torch.Tensor]) -> None:
        chosen.append(out["expert_index"].cpu())
        probabilities.append(torch.softmax(out["router_logits"].float(), dim=-1).cpu())

    # The head runs where it always runs at inference (apply_head_stages: eval mode, float32, the
    # model's mode restored after); the hook only reads where it sent each text.
    handle = head.register_forward_hook(record)
    try:
        # Routing is the gate's: a query-side head routes queries only.
        apply_head_stages(retriever, pooled, "query", batch_size=batch_size)
    finally:
        handle.remove()
    if not chosen:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, head.num_experts)
    return torch.cat(chosen), torch.cat(probabilities)


class RoutingTracker:
    """Counts, over an epoch, which expert each training text was routed to.

    Texts are added by kind (``query``, ``document``). ``usage_queries`` / ``usage_documents`` are
    the shares of texts whose selected (noisy, while training) top-1 expert is m; ``entropy_*`` the
    entropy of that distribution (``log N`` when even); ``noisy_clean_agreement`` how often the
    noisy selection equals the clean top-1 of the gate.
    """

    LABELS: ClassVar[dict[str, str]] = {"query": "queries", "document": "documents"}

    def __init__(self) -> None:
        self.counts: dict[str, torch.Tensor] = {}
        self.agree = 0
        self.total = 0

    def add(self, kind: str, features: dict[str, Any]) -> None:
        """Count the selections in ``features`` (``expert_index``, ``router_logits``) of ``kind`` texts.

        Texts the head did not route (documents under a query-side head) are not counted.
        """
        if "expert_index" not in features:
            return
        chosen = features["expert_index"].detach().cpu()
        clean = features["router_logits"].detach().argmax(dim=-1).cpu()
        num_experts = features["router_logits"].shape[-1]
        counts = torch.bincount(chosen, minlength=num_experts)
        self.counts[kind] = self.counts.get(kind, torch.zeros_like(counts)) + counts
        self.agree += int((chosen == clean).sum())
        self.total += len(chosen)

    def summary(self) -> dict[str, Any]:
        if not self.total:
            return {}
        summary: dict[str, Any] = {"noisy_clean_agreement": self.agree / self.total}
        for kind, counts in self.counts.items():
            usage = counts.double() / counts.sum()
            label = self.LABELS[kind]
            summary[f"usage_{label}"] = [round(float(u), 4) for u in usage]
            summary[f"entropy_{label}"] = float(-(usage * usage.clamp_min(1e-12).log()).sum())
        return summary
