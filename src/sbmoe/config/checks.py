"""Checks the config ``validate()`` methods share: sizes that multiply memory, seeds, metric names.

A size that multiplies memory (experts, batch sizes, hard negatives, top-k) has an upper bound, so a
typo such as ``--num-experts 100000`` ends in one line saying the limit and why, before anything is
allocated. The bounds sit well above what any recipe in this project uses.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from sbmoe.core.errors import UsageError

# Each expert holds about d*d weights (d -> d/2 -> d): 2.4 MB in float32 at d=768, four times that
# while training (gradient, two Adam moments); the studies here use 3 to 12 experts.
MAX_NUM_EXPERTS = 256
# The texts of one forward pass: activations grow with batch x tokens x hidden size per layer.
MAX_ENCODE_BATCH_SIZE = 8192
# Every query is scored against every document of its step: batch x batch x (1 + hard negatives)
# float32 scores, stored again for their gradient. 2**28 scores are 1 GiB.
MAX_IN_BATCH_SCORES = 2**28
# Each mined negative adds a batch of documents to every step's forward pass.
MAX_HARD_NEGATIVES = 256
# Documents kept per query: search returns (and ranx scores) queries x K entries.
MAX_DOCUMENTS_TOP_K = 100_000
# NumPy's legacy seeding (numpy.random.seed, RandomState) takes 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1

# ranx's metric names (ranx.metrics.metric_switch). Each takes an optional cutoff "@k" and an
# optional relevance level "-lN" (a document counts as relevant from grade N); rbp takes its
# persistence instead, e.g. "rbp.95".
RANX_METRICS = (
    "hits",
    "hit_rate",
    "precision",
    "recall",
    "f1",
    "r-precision",
    "mrr",
    "map",
    "dcg",
    "dcg_burges",
    "ndcg",
    "ndcg_burges",
    "bpref",
)
_METRIC = re.compile(r"(?P<name>[a-z0-9_-]+?)(@(?P<k>\d+))?(-l(?P<level>\d+))?")
_RBP = re.compile(r"rbp[.@]\d+(-l\d+)?")


def check_at_most(name: str, value: int | None, limit: int, why: str) -> None:
    """Raise ``UsageError`` when ``value`` exceeds ``limit``, saying the limit and ``why`` it exists."""
    if value is not None and value > limit:
        raise UsageError(f"{name} must be <= {limit}, got {value}: {why}")


def check_seed(name: str, value: int) -> None:
    """Raise ``UsageError`` unless ``value`` is a seed every random generator here accepts."""
    if not 0 <= value <= MAX_SEED:
        raise UsageError(f"{name} must be in [0, 2**32 - 1] (what NumPy accepts), got {value}")


def check_metric_names(names: Iterable[str], field: str = "metrics") -> None:
    """Raise ``UsageError`` for the first name ranx cannot compute, listing the names it can."""
    for name in names:
        if not isinstance(name, str) or not is_metric_name(name):
            raise UsageError(
                f"{field}: metric {name!r} is not supported; use one of {', '.join(RANX_METRICS)}, "
                "each optionally with a cutoff @k (e.g. ndcg@10, recall@100), or rbp.95"
            )


def is_metric_name(name: str) -> bool:
    """Whether ranx computes ``name`` (e.g. ``ndcg@10``, ``mrr``, ``map@100-l2``, ``rbp.95``)."""
    if _RBP.fullmatch(name):
        return True
    match = _METRIC.fullmatch(name)
    if match is None or match["name"] not in RANX_METRICS:
        return False
    return all(match[part] is None or int(match[part]) >= 1 for part in ("k", "level"))
