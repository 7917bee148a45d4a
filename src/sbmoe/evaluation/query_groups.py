"""Seen and unseen queries: test queries grouped by whether their answers were training positives.

On collections whose test queries share relevant documents with training queries (on BEIR SciFact
216 of the 339 test pairs point at a document that is also a training positive), a fine-tuned model
can gain by learning *documents* rather than learning to retrieve. Splitting the evaluated queries
by how many of their relevant documents the collection's ``train`` split already judged relevant
shows which it did:

* ``seen``: every relevant document of the query is a positive of some training query;
* ``partly-seen``: some are, some are not;
* ``unseen``: none is.

Relevant means a qrels score above 0 (as in the metrics). A query without any relevant document
belongs to no group (it scores 0 for every system and would be "all" and "none" at once).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

SEEN, PARTLY_SEEN, UNSEEN = "seen", "partly-seen", "unseen"
GROUPS: tuple[str, ...] = (SEEN, PARTLY_SEEN, UNSEEN)
# The split whose positives count as seen; evaluating that split itself has no groups.
TRAIN_SPLIT = "train"

QueryGroups = dict[str, list[str]]


def training_positives(train_qrels: Mapping[str, Mapping[str, int]]) -> set[str]:
    """Doc ids judged relevant (score > 0) to any query of the training qrels."""
    return {doc_id for judged in train_qrels.values() for doc_id, grade in judged.items() if grade > 0}


def group_queries(qrels: Mapping[str, Mapping[str, int]], seen_documents: set[str]) -> QueryGroups:
    """Split the queries of ``qrels`` into :data:`GROUPS` by their relevant documents.

    Args:
        qrels: Query id -> doc id -> relevance grade of the evaluated split.
        seen_documents: The training positives (:func:`training_positives`).

    Returns:
        Group name -> query ids (in qrels order), every group present, possibly empty. Queries
        without a relevant document are in none.
    """
    groups: QueryGroups = {name: [] for name in GROUPS}
    for query_id, judged in qrels.items():
        relevant = [doc_id for doc_id, grade in judged.items() if grade > 0]
        if not relevant:
            continue
        seen = sum(doc_id in seen_documents for doc_id in relevant)
        name = SEEN if seen == len(relevant) else UNSEEN if seen == 0 else PARTLY_SEEN
        groups[name].append(query_id)
    return groups


def split_query_groups(
    split_qrels: Mapping[str, Mapping[str, Mapping[str, int]]], split: str
) -> QueryGroups | None:
    """The query groups of ``split`` given a collection's qrels per split.

    Returns:
        None when there is no ``train`` split to compare with, or ``split`` is the training split.
    """
    if split == TRAIN_SPLIT or TRAIN_SPLIT not in split_qrels:
        return None
    return group_queries(split_qrels[split], training_positives(split_qrels[TRAIN_SPLIT]))


def splits_to_load(root: str | os.PathLike, split: str) -> list[str]:
    """The qrels splits an evaluation of ``split`` in the BEIR folder ``root`` reads: ``split``, and
    ``train`` for the query groups when the folder has it."""
    has_train = (Path(root) / "qrels" / f"{TRAIN_SPLIT}.tsv").is_file()
    return [split, TRAIN_SPLIT] if has_train and split != TRAIN_SPLIT else [split]


def group_scores(
    per_query: Mapping[str, Mapping[str, float]], groups: Mapping[str, list[str]]
) -> dict[str, dict[str, Any]]:
    """Query count and mean of every metric per group.

    Args:
        per_query: Metric -> query id -> score.
        groups: Group name -> query ids.

    Returns:
        Group name -> ``{"num_queries": n, metric: mean, ...}``; an empty group has only its count.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name, query_ids in groups.items():
        entry: dict[str, Any] = {"num_queries": len(query_ids)}
        if query_ids:
            for metric, scores in per_query.items():
                entry[metric] = float(np.mean([scores.get(q, 0.0) for q in query_ids]))
        summary[name] = entry
    return summary


def restrict(scores: Mapping[str, float], query_ids: list[str]) -> dict[str, float]:
    """The per-query scores of ``query_ids`` only (those ``scores`` has)."""
    return {q: scores[q] for q in query_ids if q in scores}
