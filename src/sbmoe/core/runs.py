"""Runs as plain dictionaries (ranx's convention), and merging the top-k lists of disjoint corpora.

A run maps query id -> doc id -> score, each query's documents best first. It is what every search
returns (:mod:`sbmoe.retrieval`: FAISS, sharded and Milvus indexes alike, and the search jobs) and what
:mod:`sbmoe.evaluation.metrics` scores; this module is the lowest layer that both build on.
"""

from __future__ import annotations

import heapq
import itertools
import numbers
from collections.abc import Sequence

from sbmoe.core.errors import UsageError

Run = dict[str, dict[str, float]]


def merge_runs(runs: Sequence[Run], k: int) -> Run:
    """Merge runs over disjoint document sets into one top-``k`` run (the top-k of the top-ks).

    Each run lists a query's documents best first. Equal scores keep the order of ``runs`` and,
    within a run, its own order, so merging the runs of consecutive shards of a flat index gives
    exactly the ranking of one flat index over all of them.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise UsageError(f"k must be a positive integer, got {k!r}")
    merged: Run = {}
    for query_id in dict.fromkeys(q for run in runs for q in run):
        lists = [run[query_id].items() for run in runs if query_id in run]
        merged[query_id] = dict(itertools.islice(heapq.merge(*lists, key=lambda item: -item[1]), k))
    return merged
