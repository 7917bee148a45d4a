"""Config fields that carry their command-line flag: help text, choices, metavar, and shared settings.

A setting that more than one job has (precision, encode batch size, top-k, exclude-self) is
declared once here, so its flag means the same in every verb."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import field
from typing import Any

from sbmoe.core.choices import EXPERT_POOLINGS, INFERENCE_PRECISIONS, PRECISIONS


def setting(
    default: Any = dataclasses.MISSING,
    *,
    help: str,
    choices: Sequence[Any] | None = None,
    flag: str | None = None,
    default_factory: Any = dataclasses.MISSING,
    metavar: str | None = None,
) -> Any:
    """A config field with the help text and choices its command-line flag is generated from.

    A list field's flag takes one or more values (``nargs="+"``), from its type.

    Args:
        default: The field's default.
        help: One line for ``--help``; the default is appended by the parser.
        choices: Allowed values (also checked by ``validate``).
        flag: The flag when it is not ``--`` + the field name with dashes.
        default_factory: For mutable defaults.
        metavar: Placeholder shown in ``--help``.
    """
    metadata = {
        "help": help,
        "choices": tuple(choices) if choices else None,
        "flag": flag,
        "metavar": metavar,
    }
    if default_factory is not dataclasses.MISSING:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


# Settings that more than one job has, with the same meaning everywhere: defined once here.
def precision_setting() -> Any:
    return setting(
        "auto",
        choices=PRECISIONS,
        help="bf16 (autocast, bf16 weight copies when encoding), fp32, or auto: bf16 where the "
        "CPU (AMX, AVX512-BF16) or GPU computes bf16 fast, else fp32",
    )


def inference_precision_setting() -> Any:
    return setting(
        "auto",
        choices=INFERENCE_PRECISIONS,
        help="numerics of the backbone: fp32, bf16 (torch backend), int8 (onnx backend), or auto: "
        "what --backend auto picks for this machine",
    )


def encode_batch_size_setting() -> Any:
    return setting(64, help="texts per forward pass when encoding", metavar="N")


def documents_top_k_setting(default: int) -> Any:
    return setting(default, help="documents retrieved per query", metavar="K")


def expert_poolings_setting(verb: str) -> Any:
    return setting(
        default_factory=list,
        flag="--expert-pooling",
        choices=EXPERT_POOLINGS,
        help=f"inference rule(s) of an MoE model to {verb}; several share one encoding pass "
        "(none given: the model's own)",
    )


def exclude_self_setting() -> Any:
    return setting(
        False,
        help="drop a retrieved document whose id equals the query id (BEIR's rule for collections "
        "whose queries are also documents, e.g. ArguAna, Quora)",
    )
