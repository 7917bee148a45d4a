"""The retriever as one trainable module: ids of queries and documents in, their features out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from sbmoe.inference.encoding import run_stages, tokenize
from sbmoe.model.retriever import Retriever
from sbmoe.training.training_data import TrainingData

# What training reads from the pipeline's features; the rest (token embeddings, noisy logits) is dropped.
OUTPUT_KEYS = ("sentence_embedding", "router_logits", "expert_index")


class TrainableEncoder(nn.Module):
    """Runs the pipeline stage by stage (Transformer -> Pooling -> MoEHead -> Normalize) for training.

    One forward call embeds every kind of text of a step (``{"query": ids, "document": ids}``), so
    DistributedDataParallel, which wraps this module, sees one forward per backward.

    Args:
        retriever: The model; its parameters are this module's.
        data: The texts, or their pooled embeddings under head-only training.
        frozen_backbone: Run the stages up to pooling without gradients and without dropout.
        router_gradients: Keep ``router_logits`` differentiable (a router loss reads them).
            Otherwise they are detached, so that DDP does not wait for gradients of a gate that
            nothing back-propagates into (``paper`` gating).
    """

    def __init__(
        self, retriever: Retriever, data: TrainingData, frozen_backbone: bool, router_gradients: bool
    ) -> None:
        super().__init__()
        self.model = retriever.model
        self.retriever = retriever
        self.data = data
        self.frozen_backbone = frozen_backbone
        self.router_gradients = router_gradients

    def forward(self, ids: Mapping[str, Sequence[str]]) -> dict[str, dict[str, Tensor]]:
        """Features (``sentence_embedding``, and with a head ``router_logits``, ``expert_index``) by kind."""
        return {kind: self._embed(kind, kind_ids) for kind, kind_ids in ids.items()}

    def _embed(self, kind: str, ids: Sequence[str]) -> dict[str, Tensor]:
        retriever = self.retriever
        if self.data.pooled is not None:
            pooled = self.data.pooled.lookup(kind, ids).to(retriever.device)
            features = run_stages(retriever.head_stages(), {"sentence_embedding": pooled}, kind)
        else:
            features = tokenize(retriever, self.data.texts(kind, ids), kind)
            if self.frozen_backbone:
                with torch.no_grad():
                    features = run_stages(retriever.encoder_stages(), features)
                features = run_stages(retriever.head_stages(), features, kind)
            else:
                features = run_stages(self.model.children(), features, kind)
        outputs = {key: features[key] for key in OUTPUT_KEYS if key in features}
        if "router_logits" in outputs and not self.router_gradients:
            outputs["router_logits"] = outputs["router_logits"].detach()
        return outputs

    def train(self, mode: bool = True) -> TrainableEncoder:
        super().train(mode)
        if self.frozen_backbone:
            for stage in self.retriever.encoder_stages():
                stage.eval()  # frozen means no dropout either
        return self
