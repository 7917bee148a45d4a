"""Named presets (``default``, ``paper``) and building validated model and training configs from one."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sbmoe.config.base import from_dict
from sbmoe.config.model import ModelConfig
from sbmoe.config.train import TrainConfig
from sbmoe.core.errors import UsageError


@dataclass
class Preset:
    """Named defaults for a model and its training."""

    description: str
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(
        description=(
            "Follows the backbone's own pooling, similarity and max length; learned gating with "
            "load balancing; AdamW 2e-5 (backbone) / 1e-3 (head), temperature 0.05, batch 32, "
            "warm-up + linear decay, best checkpoint on dev nDCG@10, bf16 where the hardware is fast."
        ),
    ),
    "paper": Preset(
        description=(
            "The published SB-MoE recipe: mean pooling, dot product on unnormalised embeddings, "
            "512 tokens, paper gating (noisy top-1), head lr 1e-4 / backbone lr 1e-6, constant "
            "schedule, batch 64, temperature 1, lower-cased texts, last epoch kept, float32."
        ),
        model={
            "pooling": "mean",
            "similarity": "dot",
            "max_query_length": 512,
            "max_doc_length": 512,
            "gating": "paper",
            "lowercase": True,
        },
        train={
            "epochs": 30,
            "batch_size": 64,
            "lr_backbone": 1e-6,
            "lr_head": 1e-4,
            "weight_decay": 0.01,
            "temperature": 1.0,
            "scheduler": "constant",
            "warmup_ratio": 0.0,
            "max_grad_norm": 0.0,
            "load_balancing_coef": 0.0,
            "router_z_loss_coef": 0.0,
            "mask_false_negatives": False,
            "dev_fraction": 0.05,
            "checkpoint_selection": "last",
            "precision": "fp32",
        },
    ),
}


def build_configs(
    preset: str = "default",
    model_overrides: dict[str, Any] | None = None,
    train_overrides: dict[str, Any] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Start from a preset and apply explicit overrides (``None`` values are skipped).

    The training config is validated here; the model config where the model is built
    (:meth:`sbmoe.model.retriever.Retriever.from_config`), which every route to a model passes:
    the command line, a grid, and a Python caller's own ``ModelConfig``.
    """
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    chosen = PRESETS[preset]
    model_values = {**chosen.model, **{k: v for k, v in (model_overrides or {}).items() if v is not None}}
    train_values = {**chosen.train, **{k: v for k, v in (train_overrides or {}).items() if v is not None}}
    model_config = from_dict(ModelConfig, model_values, source=f"preset {preset}")
    if model_config.head_side == "query":
        train_values = _query_side_training(train_values)
    train_config = from_dict(TrainConfig, train_values, source=f"preset {preset}")
    train_config.validate()
    return model_config, train_config


# Why a query-side head never trains the backbone (the start of both refusals that say so).
QUERY_SIDE_TRAINS_ALONE = (
    "a query-side head trains alone: the backbone stays frozen because it encodes the documents of the index"
)


def _query_side_training(train_values: dict[str, Any]) -> dict[str, Any]:
    """A query-side head trains alone, on cached backbone embeddings unless the backbone is frozen."""
    if train_values.get("head_only") is False and not train_values.get("freeze_backbone"):
        raise UsageError(f"{QUERY_SIDE_TRAINS_ALONE}; drop --no-head-only")
    return {"head_only": not train_values.get("freeze_backbone"), **train_values}
