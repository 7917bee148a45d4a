"""ir_datasets collections (``irds:beir/scifact/test``), exported once into a BEIR folder in the cache.

The BEIR loader then reads and validates the folder like any other, so an ``irds:`` collection
behaves like a BEIR folder everywhere (train, evaluate, index, experiments). A dataset with qrels
(``beir/scifact/test``) becomes one split named after the last part of its name (``test``); one
without (``beir/scifact``) takes the qrels of each of its direct subsets that share its documents
(``train``, ``test``). ir_datasets reads its own copies from ``$IR_DATASETS_HOME`` (default
``~/.ir_datasets``) and downloads what it lacks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sbmoe.core.errors import DataError, DataWarning, first_line
from sbmoe.core.io import atomic_directory

IRDS_PREFIX = "irds:"


def is_irds_name(name: str) -> bool:
    """Whether ``name`` names an ir_datasets collection (``irds:<dataset id>``)."""
    return name.startswith(IRDS_PREFIX)


def export_irds(name: str, cache: str | os.PathLike) -> Path:
    """The BEIR folder of the ir_datasets collection ``name``, exported into ``cache`` on first use.

    Args:
        name: ``irds:`` followed by an ir_datasets id, e.g. ``irds:beir/scifact/test``.
        cache: Folder of exported collections; the export goes to ``<cache>/<id with / as __>``.

    Raises:
        DataError: ir_datasets does not know the id, has neither documents nor queries for it, or
            could not read or download it (the message names ``$IR_DATASETS_HOME``).
    """
    dataset_id = name[len(IRDS_PREFIX) :] if is_irds_name(name) else name
    target = Path(cache).expanduser() / dataset_id.replace("/", "__")
    if (target / "corpus.jsonl").is_file():
        return target
    import ir_datasets

    home = os.environ.get("IR_DATASETS_HOME") or str(Path.home() / ".ir_datasets")
    try:
        with _quiet(ir_datasets), atomic_directory(target) as staging:
            _export(ir_datasets, dataset_id, staging)
    except DataError:
        raise
    # What ir_datasets raises for no network, missing local files, bad archives or files (requests'
    # errors are OSErrors; a failed mirror list is a RuntimeError; a bad header an AssertionError).
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError, zipfile.BadZipFile) as error:
        raise DataError(
            f"{IRDS_PREFIX}{dataset_id}: ir_datasets could not read or download it "
            f"({type(error).__name__}: {first_line(error)}); without network, put its files where "
            f"ir_datasets keeps them ($IR_DATASETS_HOME, now {home})"
        ) from error
    return target


@contextlib.contextmanager
def _quiet(ir_datasets: Any) -> Iterator[None]:
    """Silence ir_datasets' info and retry lines: a failure ends in one error line of ours."""
    logger = ir_datasets.log.easy().logger()  # made at level INFO on first use, so made here first
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _export(ir_datasets: Any, dataset_id: str, folder: Path) -> None:
    try:
        dataset = ir_datasets.load(dataset_id)
    except KeyError:
        raise DataError(
            f"{IRDS_PREFIX}{dataset_id}: not a dataset ir_datasets knows (ids: ir-datasets.com)"
        ) from None
    if not dataset.has_docs():
        raise DataError(f"{IRDS_PREFIX}{dataset_id}: ir_datasets has no documents for it")
    splits = _splits(ir_datasets, dataset_id, dataset)
    sources = [dataset] if dataset.has_queries() else [s for s in splits.values() if s.has_queries()]
    if not sources:
        raise DataError(f"{IRDS_PREFIX}{dataset_id}: ir_datasets has no queries for it")
    with open(folder / "corpus.jsonl", "w", encoding="utf-8") as out:
        for doc in dataset.docs_iter():
            title = doc.title if "title" in doc._fields else ""
            _write_json_line(out, {"_id": doc.doc_id, "title": title, "text": _text(doc)})
    seen: set[str] = set()
    with open(folder / "queries.jsonl", "w", encoding="utf-8") as out:
        for source in sources:
            for query in source.queries_iter():
                if query.query_id not in seen:  # subsets may share queries
                    seen.add(query.query_id)
                    _write_json_line(out, {"_id": query.query_id, "text": _text(query)})
    (folder / "qrels").mkdir()
    for split, source in splits.items():
        with open(folder / "qrels" / f"{split}.tsv", "w", encoding="utf-8") as out:
            out.write("query-id\tcorpus-id\tscore\n")
            for qrel in source.qrels_iter():
                ids = (qrel.query_id, qrel.doc_id)
                if any(set(value) & {"\t", "\n", "\r"} for value in ids):
                    raise DataError(f"{IRDS_PREFIX}{dataset_id}: qrels id with a tab or line break: {ids!r}")
                out.write(f"{qrel.query_id}\t{qrel.doc_id}\t{qrel.relevance}\n")
    _warn_grades(dataset_id, splits)


def _warn_grades(dataset_id: str, splits: dict[str, Any]) -> None:
    """Say what each positive grade means where ir_datasets defines them: sbmoe (as BEIR) counts every
    grade above 0 as relevant, and some collections grade non-answers 1 (ANTIQUE, TREC DL)."""
    definitions = {}
    for source in splits.values():
        defined = source.qrels_defs() if hasattr(source, "qrels_defs") else None
        definitions.update({grade: text for grade, text in (defined or {}).items() if grade > 0})
    if definitions:
        listed = "; ".join(f"{grade} = {text}" for grade, text in sorted(definitions.items()))
        warnings.warn(
            f"{IRDS_PREFIX}{dataset_id}: every grade above 0 counts as relevant; ir_datasets defines "
            f"them as: {listed}",
            DataWarning,
            stacklevel=3,
        )


def _splits(ir_datasets: Any, dataset_id: str, dataset: Any) -> dict[str, Any]:
    """Split name -> dataset whose qrels it holds."""
    if dataset.has_qrels():
        return {dataset_id.rsplit("/", 1)[-1]: dataset}
    prefix = dataset_id + "/"
    splits = {}
    for child_id in sorted(ir_datasets.registry):
        if not child_id.startswith(prefix) or "/" in child_id[len(prefix) :]:
            continue
        child = ir_datasets.load(child_id)
        if child.has_qrels() and child.has_docs() and child.docs_handler() is dataset.docs_handler():
            splits[child_id[len(prefix) :]] = child
    return splits


def _text(record: Any) -> str:
    return record.text if "text" in record._fields else record.default_text()


def _write_json_line(out: Any, record: dict[str, str]) -> None:
    out.write(json.dumps(record, ensure_ascii=False) + "\n")
