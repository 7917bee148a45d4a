"""The model config: backbone, pooling, similarity, token limits and the head (saved as ``sbmoe.json``)."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, TypeVar

from sbmoe.config.base import ConfigBase, check_choices
from sbmoe.config.checks import MAX_NUM_EXPERTS, check_at_most
from sbmoe.config.fields import setting
from sbmoe.core.choices import (
    EXPERT_POOLINGS,
    GATING_VARIANTS,
    HEAD_SIDES,
    HEADS,
    POOLINGS,
    SIMILARITIES,
    ExpertPooling,
    GatingVariant,
    Similarity,
)
from sbmoe.core.errors import UsageError


@dataclass
class ModelConfig(ConfigBase):
    """How to build an SB-MoE retriever from a backbone encoder (saved as ``sbmoe.json``)."""

    backbone: str = setting(
        "all-MiniLM-L6-v2",
        flag="--model",
        help="hub name, local directory (a saved sbmoe, sentence-transformers or transformers "
        "model), or all-MiniLM-L6-v2 (offline copy)",
    )
    pooling: str | None = setting(
        None, choices=POOLINGS, help="pooling of the last layer (none given: the backbone's own, else mean)"
    )
    similarity: Similarity = setting(
        "auto", choices=SIMILARITIES, help="cosine, dot, or auto (the backbone's own, else cosine)"
    )
    max_query_length: int | None = setting(
        None,
        help="token limit for queries (none given: the backbone's own limit, its max_seq_length, else 256)",
        metavar="TOKENS",
    )
    max_doc_length: int | None = setting(
        None,
        help="token limit for documents (none given: the backbone's own limit, its max_seq_length, else 256)",
        metavar="TOKENS",
    )
    num_experts: int = setting(
        6, help="experts in the MoE block, at most 256; 0 = the plain fine-tuned baseline (no head)"
    )
    head: Literal["moe", "linear"] = setting(
        "moe",
        choices=HEADS,
        help="moe (the SB-MoE block, --num-experts experts; 0 = no head) or linear (a control: one "
        "zero-initialised residual Linear(d, d), no experts or gate; --num-experts is ignored)",
    )
    head_side: Literal["both", "query"] = setting(
        "both",
        choices=HEAD_SIDES,
        help="both (queries and documents pass the head: the paper's design) or query (only queries do; "
        "documents keep the backbone's embeddings, so an index built with the backbone stays valid; "
        "trains the head alone)",
    )
    expert_pooling: ExpertPooling = setting(
        "top1",
        choices=EXPERT_POOLINGS,
        help="how expert outputs combine: top1, topk (--experts-top-k experts) or all (softmax-weighted)",
    )
    experts_top_k: int = setting(2, help="experts combined under --expert-pooling topk", metavar="K")
    gating: GatingVariant = setting(
        "learned",
        choices=GATING_VARIANTS,
        help="learned (the gate scales normalised expert outputs and trains), paper (the published "
        "code: the gate cancels and gets no gradient) or random (gate fixed at its initialisation)",
    )
    noisy_gating: bool = setting(True, help="add learned Gaussian noise to the gate logits while training")
    expert_dropout: float = setting(
        0.0, help="probability of hiding an expert from a text while training", metavar="P"
    )
    lowercase: bool = setting(False, help="lower-case every query and document before tokenisation")

    # Keys that older versions wrote under another name: in configs and sbmoe.json, and in the record
    # of a head saved by sbmoe 0.1 (its config.json, see HeadConfig). The one place they are translated.
    RENAMED: ClassVar[dict[str, str]] = {"top_k": "experts_top_k", "side": "head_side"}

    def validate(self) -> None:
        """Raise ``UsageError`` naming the first field that holds an unusable value.

        Token limits are checked against the backbone's own when the model is built
        (:class:`~sbmoe.model.retriever.Retriever`): only the backbone knows them.
        """
        check_choices(self)
        if self.num_experts < 0:
            raise UsageError(f"num_experts must be >= 0 (0 = no MoE head), got {self.num_experts}")
        check_at_most(
            "num_experts",
            self.num_experts,
            MAX_NUM_EXPERTS,
            "each expert holds about d x d weights (2.4 MB at d=768, four times that while training)",
        )
        if self.experts_top_k < 1:
            raise UsageError(f"experts_top_k must be >= 1, got {self.experts_top_k}")
        if self.has_moe_head() and self.expert_pooling == "topk" and self.experts_top_k > self.num_experts:
            raise UsageError(
                f"experts_top_k must be between 1 and num_experts={self.num_experts}, "
                f"got {self.experts_top_k}"
            )
        if not self.has_moe_head() and self.expert_pooling != "top1":
            # Warned, not refused: a grid's model settings reach its head-less baselines too.
            without = "head='linear'" if self.head == "linear" else "num_experts=0"
            warnings.warn(
                f"expert_pooling={self.expert_pooling!r} is ignored: the model has no MoE head ({without})",
                UserWarning,
                stacklevel=1,  # one place: shown once however often the config is validated
            )
        if not 0 <= self.expert_dropout < 1:
            raise UsageError(f"expert_dropout must be in [0, 1), got {self.expert_dropout}")
        for name in ("max_query_length", "max_doc_length"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise UsageError(f"{name} must be at least 2 tokens, got {value}")
        if self.head_side == "query" and self.head == "moe" and self.num_experts == 0:
            raise UsageError("head_side query needs a head: --num-experts > 0 or --head linear")

    def has_moe_head(self) -> bool:
        """Whether this config builds an MoE head (the experts and gate that expert pooling applies to)."""
        return self.head == "moe" and self.num_experts > 0


HeadConfigT = TypeVar("HeadConfigT", bound="HeadConfig")
# What a head reads, rather than how it is set: HeadConfig's fields that are not ModelConfig's.
_HEAD_INPUT = ("embedding_dimension", "normalize_input")


@dataclass(frozen=True)
class HeadConfig(ConfigBase):
    """What a head on the pooled embedding is built from: its one saved record (its ``config.json``).

    Besides its input, the head records its settings under the names, and with the defaults, of the
    :class:`ModelConfig` fields they come from, so a saved model holds each setting once: the head's
    in its own folder, the rest in ``sbmoe.json``. Records of sbmoe 0.1 load through
    :attr:`ModelConfig.RENAMED` (:class:`~sbmoe.model.head.SavedModule` renames their keys).

    Attributes:
        embedding_dimension: Dimension d of the pooled embedding.
        normalize_input: L2-normalise the pooled embedding before the head (set when the model
            scores with cosine similarity, as the published code does).
        head_side: ``both`` (queries and documents) or ``query`` (documents keep the backbone's embedding).
    """

    embedding_dimension: int
    normalize_input: bool = False
    head_side: Literal["both", "query"] = ModelConfig.head_side

    @classmethod
    def from_model(
        cls: type[HeadConfigT], config: ModelConfig, embedding_dimension: int, normalize_input: bool
    ) -> HeadConfigT:
        """The head ``config`` describes, on embeddings of ``embedding_dimension``."""
        names = cls.model_fields()
        return cls(embedding_dimension, normalize_input, **{name: getattr(config, name) for name in names})

    @classmethod
    def model_fields(cls) -> tuple[str, ...]:
        """The fields that are :class:`ModelConfig`'s (all but the head's input)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in _HEAD_INPUT)

    def model_settings(self) -> dict[str, Any]:
        """The :class:`ModelConfig` fields this head records, with their values."""
        return {name: getattr(self, name) for name in self.model_fields()}


@dataclass(frozen=True)
class MoEHeadConfig(HeadConfig):
    """The settings of the MoE head (:class:`~sbmoe.model.moe_head.MoEHead`), in :class:`ModelConfig`'s names.

    Their meaning is that of the :class:`ModelConfig` fields of the same name.
    """

    num_experts: int = ModelConfig.num_experts
    expert_pooling: ExpertPooling = ModelConfig.expert_pooling
    experts_top_k: int = ModelConfig.experts_top_k
    gating: GatingVariant = ModelConfig.gating
    noisy_gating: bool = ModelConfig.noisy_gating
    expert_dropout: float = ModelConfig.expert_dropout
