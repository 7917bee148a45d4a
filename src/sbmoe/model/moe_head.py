"""The single-block Mixture-of-Experts head, as a sentence-transformers module.

Notation follows ``docs/moe-head.md``: ``x`` is the pooled embedding (dimension d), expert
``E_m(x) = W2 relu(W1 x + b1) + b2`` (d -> d/2 -> d), gate logits ``h(x) = V2 relu(V1 x + c1) + c2``
(d -> d/2 -> N), and, while training, noise ``softplus(U x + u) * eps`` added to the logits.

Three gating variants:

- ``paper`` (the published code): ``y = normalize(sum_m g_m E_m(x)) + x``. Training uses noisy top-1;
  with a single non-zero ``g_m`` the normalisation cancels it, so the gate and noise networks get no
  gradient from the loss. Inference uses clean top-1 or ``all`` (softmax over every expert).
- ``learned``: ``y = x + sum_m g_m normalize(E_m(x))`` with ``g = softmax(h)`` kept on the selected
  experts (Switch-Transformer style for top-1, the full softmax for ``all``), so the gate reaches the
  loss. Training selects experts on the noisy logits.
- ``random`` (a control): combined like ``learned``, but the gate keeps its random initialisation and
  gets no noise, so each text goes to a fixed, input-dependent but unlearned, expert mixture.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from sbmoe.config.model import MoEHeadConfig
from sbmoe.core.choices import EXPERT_POOLINGS, GATING_VARIANTS
from sbmoe.core.errors import ModelLoadError
from sbmoe.model.head import NORMALIZE_EPS, Head


class MoEHead(Head):
    """N bottleneck experts, a (noisy) gate, and a residual connection onto the pooled embedding.

    The head reads ``features["sentence_embedding"]`` and replaces it with the head's output. It also
    leaves ``router_logits`` (clean gate logits), ``router_noisy_logits`` (what selection used) and
    ``expert_index`` (the top-1 expert per text) in the features, for auxiliary losses and usage
    statistics.

    Args:
        config: Its settings, named and meant as the :class:`~sbmoe.config.model.ModelConfig` fields
            they come from. Under ``paper`` gating ``expert_pooling`` is the inference rule only;
            training always uses noisy top-1, as the published code does. ``expert_dropout`` hides
            each expert from each text with that probability while training (at least one stays).
            A ``query``-side head (see :mod:`sbmoe.model.head`) starts each expert's last layer at
            zero and mixes expert outputs as they are, not scaled to unit length, so the untrained
            head is the identity and its change grows as fast as a linear adapter's.
    """

    kind = "moe"

    config_class: ClassVar[type[MoEHeadConfig]] = MoEHeadConfig

    def __init__(self, config: MoEHeadConfig) -> None:
        super().__init__(config)
        num_experts = config.num_experts
        if num_experts < 1:
            raise ValueError(f"MoEHead needs at least one expert, got num_experts={num_experts}")
        if config.gating not in GATING_VARIANTS:
            raise ValueError(f"gating must be one of {GATING_VARIANTS}, got {config.gating!r}")
        self.num_experts = num_experts
        self.experts_top_k = config.experts_top_k
        self.gating = config.gating
        self.noisy_gating = config.noisy_gating
        if not 0.0 <= config.expert_dropout < 1.0:
            raise ValueError(f"expert_dropout must be in [0, 1), got {config.expert_dropout}")
        self.expert_dropout = config.expert_dropout
        self.expert_pooling = config.expert_pooling  # validated by the setter

        d, hidden = config.embedding_dimension, max(config.embedding_dimension // 2, 1)
        # Experts are stored stacked (N, in, out) so all of them run as two batched matmuls.
        self.expert_w1 = nn.Parameter(torch.empty(num_experts, d, hidden))
        self.expert_b1 = nn.Parameter(torch.empty(num_experts, hidden))
        self.expert_w2 = nn.Parameter(torch.empty(num_experts, hidden, d))
        self.expert_b2 = nn.Parameter(torch.empty(num_experts, d))
        self.gate = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))
        self.noise = nn.Linear(d, num_experts)
        self._init_experts()
        if self.head_side == "query":
            # Zero last layers: the untrained query-side head is the identity, and the first step
            # already moves every expert's output (a zero-initialised scalar gain instead held the
            # change to about lr x steps of the embedding's length: nothing learned in 130 steps).
            nn.init.zeros_(self.expert_w2)
            nn.init.zeros_(self.expert_b2)
        if self.gating == "random":
            for parameter in (*self.gate.parameters(), *self.noise.parameters()):
                parameter.requires_grad_(False)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args: Any, **kwargs: Any) -> None:
        if prefix + "residual_gain" in state_dict:
            raise ModelLoadError(
                "this query-side MoE head was saved by an sbmoe version that scaled it by a residual "
                "gain (before 2026-12-03), which no longer loads: train it again (--head-side query, "
                "head-only: minutes on a CPU; the index stays valid)"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def expert_pooling(self) -> str:
        """How expert outputs are combined at inference (and, for ``learned`` gating, in training)."""
        return self._expert_pooling

    @expert_pooling.setter
    def expert_pooling(self, value: str) -> None:
        if value not in EXPERT_POOLINGS:
            raise ValueError(f"expert_pooling must be one of {EXPERT_POOLINGS}, got {value!r}")
        if value == "topk" and not 1 <= self.experts_top_k <= self.num_experts:
            raise ValueError(f"experts_top_k must be in [1, {self.num_experts}], got {self.experts_top_k}")
        self._expert_pooling = value

    def _init_experts(self) -> None:
        # The same initialisation nn.Linear uses, applied per expert.
        for weight, bias in ((self.expert_w1, self.expert_b1), (self.expert_w2, self.expert_b2)):
            fan_in = weight.shape[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(weight, -bound, bound)
            nn.init.uniform_(bias, -bound, bound)

    def experts(self, x: Tensor) -> Tensor:
        """Run every expert on ``x`` (B, d); returns (B, N, d)."""
        hidden = torch.relu(torch.einsum("bd,ndh->bnh", x, self.expert_w1) + self.expert_b1)
        return torch.einsum("bnh,nhd->bnd", hidden, self.expert_w2) + self.expert_b2

    def selection_size(self) -> int:
        """Number of experts combined under the current rule and mode."""
        if self.gating == "paper" and self.training:
            return 1
        return {"top1": 1, "topk": self.experts_top_k, "all": self.num_experts}[self.expert_pooling]

    def gate_weights(self, logits: Tensor) -> Tensor:
        """Gate weights g (B, N): softmax of ``logits`` kept on the selected experts, zero elsewhere."""
        probabilities = torch.softmax(logits.float(), dim=-1).to(logits.dtype)
        k = self.selection_size()
        if k >= self.num_experts:
            return probabilities
        top = probabilities.topk(k, dim=-1).indices
        mask = torch.zeros_like(probabilities).scatter(-1, top, 1.0)
        return probabilities * mask

    def delta(self, x: Tensor, features: dict[str, Any]) -> Tensor:
        """The gated mixture of expert outputs; leaves the router features in ``features``."""
        clean_logits = self.gate(x)
        logits = clean_logits
        if self.training and self.noisy_gating and self.gating != "random":
            noise_scale = F.softplus(self.noise(x))
            logits = clean_logits + noise_scale * torch.randn_like(clean_logits)
        if self.training and self.expert_dropout > 0:
            dropped = torch.rand_like(logits) < self.expert_dropout
            dropped &= ~F.one_hot(logits.argmax(dim=-1), self.num_experts).bool() | ~dropped.all(
                -1, keepdim=True
            )
            logits = logits.masked_fill(dropped, float("-inf"))
        expert_outputs = self.experts(x)
        if self.gating == "paper":
            if self.selection_size() == 1:
                # normalize(g_m E_m(x)) = normalize(E_m(x)) for any g_m > 0: the published code's
                # gate value cancels, so the gate is used for selection only and gets no gradient.
                weights = F.one_hot(logits.argmax(dim=-1), self.num_experts).to(expert_outputs.dtype)
            else:
                weights = self.gate_weights(logits)
            mixed = torch.einsum("bn,bnd->bd", weights, expert_outputs)
            change = (
                mixed if self.head_side == "query" else F.normalize(mixed, p=2, dim=-1, eps=NORMALIZE_EPS)
            )
        else:
            # A query-side head's experts start at zero, where scaling to unit length has no gradient.
            if self.head_side != "query":
                expert_outputs = F.normalize(expert_outputs, p=2, dim=-1, eps=NORMALIZE_EPS)
            change = torch.einsum("bn,bnd->bd", self.gate_weights(logits), expert_outputs)
        features["router_logits"] = clean_logits
        features["router_noisy_logits"] = logits
        features["expert_index"] = logits.argmax(dim=-1)
        return change
