"""Retrieval metrics with ranx, TREC run files, and metric reports on disk.

Runs and qrels are plain dictionaries, as in ranx: a run maps query id -> doc id -> score, qrels map
query id -> doc id -> graded relevance (an int).

Conventions (the same as ranx, whose metric functions compute every score here):

* Every query in the qrels is evaluated and counts toward the mean. A query the system returned
  nothing for (absent from the run, or mapped to an empty dict) scores 0 on every metric.
* Run entries for queries that are not in the qrels are ignored.
* A judgment of 0 (or less) means "judged non-relevant". A query whose judgments are all 0 has no
  relevant document; ranx scores it 0 on every metric and it still counts toward the mean, so
  ``num_queries`` includes it.
* nDCG uses the relevance grade as the gain (Järvelin & Kekäläinen, as trec_eval and BEIR do).
* Documents are ranked by descending score; equal scores are ordered by ascending doc id, the same
  order :func:`write_trec_run` writes, so a run scores the same before and after a TREC round trip.

Why ranx is not fed ``Qrels``/``Run`` objects: building them stores doc ids in a NumPy ``<U{n}`` array
whose width ``n`` (the longest doc id) becomes part of the numba signature, so every new id length
triggers a fresh JIT compile (about 20 s each). They also hash doc ids to float64, which can collide,
and order tied scores arbitrarily. ``ranx.evaluate`` also accepts the numba typed lists that those
objects convert to; we build them ourselves (doc ids numbered 0, 1, 2, ... within one evaluation,
runs pre-sorted with the tie rule above), so the metric kernels see one fixed signature and compile
once, and later processes load them from numba's on-disk cache.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.config.checks import check_metric_names
from sbmoe.core.choices import PAPER_METRICS
from sbmoe.core.errors import UsageError
from sbmoe.core.io import atomic_open, read_json, write_json
from sbmoe.core.layouts import EVALUATION_FILES
from sbmoe.core.runs import Run
from sbmoe.evaluation.query_groups import group_scores

Qrels = Mapping[str, Mapping[str, int]]

QUERY_GROUPS_KEY = "query_groups"


@dataclass
class EvaluationResult:
    """Metric scores of one run against one set of qrels.

    Attributes:
        metrics: ranx metric name (e.g. ``"ndcg@10"``) -> mean over all qrels queries.
        per_query: ranx metric name -> query id -> score.
        num_queries: number of queries the means are taken over (every query in the qrels).
    """

    metrics: dict[str, float]
    per_query: dict[str, dict[str, float]]
    num_queries: int

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-ready copy: ``{"metrics": ..., "per_query": ..., "num_queries": ...}``."""
        return asdict(self)


def evaluate_run(
    qrels: Qrels,
    run: Run,
    metrics: Sequence[str] | str = PAPER_METRICS,
) -> EvaluationResult:
    """Score a run against qrels with ranx (see the module docstring for the conventions).

    Args:
        qrels: query id -> doc id -> relevance grade (int; 0 = judged non-relevant).
        run: query id -> doc id -> score (higher is better).
        metrics: ranx metric names such as ``"ndcg@10"`` or ``"recall@100"``.

    Returns:
        Means and per-query scores for every metric, over every query in ``qrels``.

    Raises:
        ValueError: empty qrels or metric list, a non-integer relevance grade, a NaN score, or a
            metric name ranx does not know.
    """
    metric_names = _metric_names(metrics)
    if not qrels:
        raise UsageError("qrels are empty: there is nothing to evaluate against")

    query_ids = list(qrels)
    doc_numbers: dict[str, int] = {}
    qrels_arrays = [_qrels_array(qid, qrels[qid], doc_numbers) for qid in query_ids]
    run_arrays = [_run_array(qid, run.get(qid) or {}, doc_numbers) for qid in query_ids]

    scores = _ranx_scores(qrels_arrays, run_arrays, metric_names)
    per_query = {
        name: dict(zip(query_ids, (float(x) for x in values), strict=True)) for name, values in scores.items()
    }
    means = {name: float(np.mean(values)) for name, values in scores.items()}
    return EvaluationResult(metrics=means, per_query=per_query, num_queries=len(query_ids))


def write_trec_run(run: Run, path: str | os.PathLike, tag: str = "sbmoe") -> Path:
    """Write a run in TREC format, ``qid Q0 docid rank score tag``, atomically.

    Ranks start at 1 and follow descending score, ties broken by ascending doc id. Scores are written
    with ``repr`` so they read back exactly. Queries with no documents write no lines.

    Args:
        run: query id -> doc id -> score.
        path: output file.
        tag: run name in the last column.

    Returns:
        The path written.

    An existing ``path`` is replaced only when it is empty or a run sbmoe wrote (every line a TREC
    line whose tag starts with ``sbmoe``): a file of the user's given as the output is never lost.

    Raises:
        ValueError: an id or the tag is empty or contains whitespace, a score is NaN, or ``path``
            holds something other than an sbmoe run.
    """
    _check_token(tag, "run tag")
    path = Path(path)
    check_run_output(path)
    with atomic_open(path) as handle:
        for qid, docs in run.items():
            _check_token(qid, "query id")
            for rank, (doc_id, score) in enumerate(_ranked(qid, docs), start=1):
                _check_token(doc_id, f"doc id (query {qid!r})")
                handle.write(f"{qid} Q0 {doc_id} {rank} {score!r} {tag}\n")
    return path


def check_run_output(path: str | os.PathLike) -> None:
    """Raise ``UsageError`` unless ``path`` is free for a run: missing, empty, or a run sbmoe wrote."""
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{path} is a directory; a run is written to a file")
    if not path.exists():
        return
    with open(path, "rb") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if fields and (len(fields) != 6 or fields[1] != b"Q0" or not fields[5].startswith(b"sbmoe")):
                raise UsageError(
                    f"{path} exists and is not a run sbmoe wrote (line {line_number}): not replacing it; "
                    "delete it or write the run elsewhere"
                )


def read_trec_run(path: str | os.PathLike) -> Run:
    """Read a TREC run file (``qid Q0 docid rank score tag`` per line) into a run dict.

    Blank lines are skipped. The score column is what counts; the rank column is only checked to be
    an integer.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a malformed line or a repeated (query, doc) pair; the message names file and line.
    """
    path = Path(path)
    run: Run = {}
    with open(path, encoding="utf-8") as handle:
        for line_number, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            where = f"{path}, line {line_number}"
            if len(fields) != 6:
                raise UsageError(
                    f"{where}: expected 6 fields 'qid Q0 docid rank score tag', "
                    f"found {len(fields)}: {line.rstrip()!r}"
                )
            qid, _, doc_id, rank, score, _ = fields
            try:
                int(rank)
            except ValueError:
                raise UsageError(f"{where}: rank {rank!r} is not an integer") from None
            try:
                value = float(score)
            except ValueError:
                raise UsageError(f"{where}: score {score!r} is not a number") from None
            docs = run.setdefault(qid, {})
            if doc_id in docs:
                raise UsageError(f"{where}: document {doc_id!r} appears twice for query {qid!r}")
            docs[doc_id] = value
    return run


def save_metrics(
    result: EvaluationResult,
    output_dir: str | os.PathLike,
    extra: Mapping[str, Any] | None = None,
    query_groups: Mapping[str, list[str]] | None = None,
) -> tuple[Path, Path]:
    """Write ``metrics.json`` and ``per_query.json`` into ``output_dir``, each atomically.

    ``metrics.json`` holds metric name -> mean, ``num_queries``, and the ``extra`` entries (e.g. model
    and dataset names); ``per_query.json`` holds metric name -> query id -> score.

    Args:
        query_groups: Group name -> query ids (see :mod:`sbmoe.evaluation.query_groups`: seen, partly-seen and
            unseen queries). When given, ``metrics.json`` also holds ``query_groups``: group name ->
            ``num_queries`` and the mean of every metric over the group, and ``query_groups.json``
            lists each group's query ids.

    Returns:
        The paths of ``metrics.json`` and ``per_query.json``.

    Raises:
        ValueError: an ``extra`` key would overwrite a metric, ``num_queries`` or ``query_groups``.
    """
    summary: dict[str, Any] = {name: float(value) for name, value in result.metrics.items()}
    summary["num_queries"] = int(result.num_queries)
    if query_groups is not None:
        summary[QUERY_GROUPS_KEY] = group_scores(result.per_query, query_groups)
    clashes = sorted(set(extra or {}) & (set(summary) | {QUERY_GROUPS_KEY}))
    if clashes:
        raise UsageError(f"extra keys {clashes} clash with metric names, 'num_queries' or 'query_groups'")
    summary.update(extra or {})

    output_dir = Path(output_dir)
    metrics_path = output_dir / EVALUATION_FILES.metrics
    per_query_path = output_dir / EVALUATION_FILES.per_query
    write_json(metrics_path, summary)
    write_json(per_query_path, result.per_query)
    groups_path = output_dir / EVALUATION_FILES.query_groups
    if query_groups is not None:
        write_json(groups_path, {name: list(ids) for name, ids in query_groups.items()})
    else:
        groups_path.unlink(missing_ok=True)  # a stale one from an earlier evaluation would mislead
    return metrics_path, per_query_path


def read_query_groups(directory: str | os.PathLike) -> dict[str, list[str]] | None:
    """The query groups :func:`save_metrics` wrote into ``directory``; None if it wrote none."""
    path = Path(directory) / EVALUATION_FILES.query_groups
    return read_json(path) if path.is_file() else None


# --------------------------------------------------------------------------------------------------
# internals


def _metric_names(metrics: Sequence[str] | str) -> list[str]:
    names = [metrics] if isinstance(metrics, str) else list(metrics)
    if not names:
        raise UsageError("no metrics requested")
    check_metric_names(names)  # before ranx, whose own error is a traceback
    return list(dict.fromkeys(names))  # drop repeats, keep order


def _qrels_array(qid: str, judged: Mapping[str, int], doc_numbers: dict[str, int]) -> np.ndarray:
    rows = []
    for doc_id, grade in judged.items():
        try:
            as_int = int(grade)
        except (TypeError, ValueError):
            as_int = None
        if as_int is None or as_int != grade:
            raise UsageError(f"qrels: relevance of {doc_id!r} for query {qid!r} is {grade!r}, not an integer")
        rows.append((doc_numbers.setdefault(doc_id, len(doc_numbers)), as_int))
    # ranx computes the ideal DCG by reading the qrels as a ranking, so they must be best-first.
    rows.sort(key=lambda row: -row[1])
    return _pairs(rows)


def _run_array(qid: str, docs: Mapping[str, float], doc_numbers: dict[str, int]) -> np.ndarray:
    # ranx takes the rows in the order given, so this is where the tie rule is applied.
    return _pairs(
        [(doc_numbers.setdefault(doc_id, len(doc_numbers)), score) for doc_id, score in _ranked(qid, docs)]
    )


def _pairs(rows: list[tuple[int, float]]) -> np.ndarray:
    # Every array has the same numba type (2-D, C-contiguous float64), empty ones included, so the
    # metric kernels are compiled for one signature only. Doc numbers stay far below 2**53: exact.
    return np.array(rows, dtype=np.float64).reshape(len(rows), 2)


def _ranked(qid: str, docs: Mapping[str, float]) -> list[tuple[str, float]]:
    """Documents of one query best-first: descending score, then ascending doc id."""
    items = []
    for doc_id, score in docs.items():
        value = float(score)
        if math.isnan(value):
            raise UsageError(f"run: score of {doc_id!r} for query {qid!r} is NaN")
        items.append((doc_id, value))
    items.sort(key=lambda item: (-item[1], item[0]))
    return items


def _ranx_scores(
    qrels_arrays: list[np.ndarray], run_arrays: list[np.ndarray], metric_names: list[str]
) -> dict[str, np.ndarray]:
    evaluate = _ranx_evaluate()
    from numba.typed import List as TypedList

    requested = list(metric_names)
    if len(requested) == 1:
        # ranx 0.3.21 raises KeyError for a single metric with return_mean=False (it looks the
        # result up under the metric name stripped of "@k"), so ask for a cheap second one.
        requested.append("hits" if requested[0] != "hits" else "precision")
    with _quiet_numba():
        results = evaluate(
            TypedList(qrels_arrays), TypedList(run_arrays), requested, return_mean=False, threads=0
        )
    return {name: np.asarray(results[name], dtype=np.float64) for name in metric_names}


@functools.cache
def _ranx_evaluate() -> Callable[..., Any]:
    # Imported on first use: ranx pulls in numba, pandas and ir_datasets (a few seconds), which
    # `import sbmoe.evaluation.metrics` should not pay.
    from ranx import evaluate

    return evaluate


@contextlib.contextmanager
def _quiet_numba() -> Iterator[None]:
    """Silence numba's compile-time warnings and undo ranx's change to numba's thread count.

    ranx's ndcg kernel emits a NumbaTypeSafetyWarning (uint64 -> int64 cast) whenever it is compiled,
    and ``ranx.evaluate`` calls ``numba.set_num_threads(1)`` for fewer than 10 queries without
    restoring it, which would slow down every later evaluation in the process.
    """
    import numba
    from numba.core.errors import NumbaTypeSafetyWarning

    threads = numba.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NumbaTypeSafetyWarning)
            yield
    finally:
        numba.set_num_threads(threads)


def _check_token(value: Any, what: str) -> None:
    if not isinstance(value, str) or value.split() != [value]:
        raise UsageError(
            f"{what} {value!r} cannot be written to a TREC file: "
            "it must be a non-empty string without whitespace"
        )
