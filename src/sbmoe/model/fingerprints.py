"""Fingerprints: SHA-256 hashes of weights and the settings that change what a model computes.

Indexes, caches and ONNX exports are keyed by them (see :class:`~sbmoe.model.retriever.Retriever`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

import numpy as np
import torch

from sbmoe.config.model import ModelConfig


def hash_weights(module: torch.nn.Module, settings: dict[str, Any]) -> str:
    """SHA-256 over ``settings`` (as JSON) and every tensor of ``module``'s state dict."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name, tensor in sorted(module.state_dict().items()):
        array = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{array.dtype}:{tuple(array.shape)}".encode())
        if array.dtype == torch.bfloat16:
            array = array.float()
        digest.update(np.ascontiguousarray(array.numpy()).tobytes())
    return digest.hexdigest()


def fingerprint_settings(config: ModelConfig, extra: dict[str, Any]) -> dict[str, Any]:
    settings = config.to_dict()
    settings.pop("backbone")  # where it came from does not change what it computes
    # The head's kind shows in the weights' names; leaving it out keeps earlier fingerprints valid,
    # and so does leaving out the side where it is the only one earlier versions had.
    settings.pop("head")
    if settings["head_side"] == "both":
        settings.pop("head_side")
    return {**settings, **extra}


def without_head(config: ModelConfig) -> ModelConfig:
    """``config`` as the bare backbone's: no head, its head settings at their defaults."""
    defaults = ModelConfig()
    head_fields = ("head", "head_side", "expert_pooling", "experts_top_k", "gating", "noisy_gating")
    return dataclasses.replace(
        config,
        num_experts=0,
        expert_dropout=defaults.expert_dropout,
        **{name: getattr(defaults, name) for name in head_fields},
    )
