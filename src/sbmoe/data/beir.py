"""BEIR collections: find or download them, load and validate them, derive training pairs and splits.

A BEIR folder holds ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``. Qrels are plain
``dict[str, dict[str, int]]`` (query id -> doc id -> relevance), the layout ranx and pytrec_eval use.
"""

from __future__ import annotations

import http.client
import os
import random
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sbmoe.core.errors import DataError, DataWarning, UsageError
from sbmoe.core.io import cache_root
from sbmoe.data.download import BEIR_SOURCE, DownloadSource, download_collection
from sbmoe.data.irds import export_irds, is_irds_name
from sbmoe.data.readers import NumericIds, iter_json_objects, iter_lines, string_field

_SPLIT_ORDER = {"train": 0, "dev": 1, "test": 2}
_T = TypeVar("_T")


@dataclass(frozen=True)
class Document:
    """One corpus entry."""

    title: str
    text: str

    @property
    def full_text(self) -> str:
        """The text to encode: ``"title text"``, or just the text when there is no title."""
        return " ".join(part for part in (self.title.strip(), self.text.strip()) if part)


@dataclass
class BeirCollection:
    """A loaded BEIR folder.

    Attributes:
        name: The folder name, e.g. ``"scifact"``.
        root: The folder the files were read from.
        corpus: Document id -> document.
        queries: Query id -> query text, for the queries of all splits together.
        qrels: Split name -> query id -> doc id -> relevance.
    """

    name: str
    root: Path
    corpus: dict[str, Document]
    queries: dict[str, str]
    qrels: dict[str, dict[str, dict[str, int]]]

    def splits(self) -> list[str]:
        """The loaded split names, ``train``, ``dev``, ``test`` first, then the others by name."""
        return sorted(self.qrels, key=lambda split: (_SPLIT_ORDER.get(split, len(_SPLIT_ORDER)), split))

    def split_qrels(self, split: str) -> dict[str, dict[str, int]]:
        """The qrels of one split (the stored dict, not a copy).

        Raises:
            DataError: The split was not loaded; the message lists those that were.
        """
        if split not in self.qrels:
            raise DataError(
                f'{self.root}: no split "{split}" (available: {", ".join(self.splits()) or "none"})'
            )
        return self.qrels[split]


def load_collection(path: str | os.PathLike, splits: Sequence[str] | None = None) -> BeirCollection:
    """Read and validate a BEIR folder.

    Args:
        path: Folder holding ``corpus.jsonl``, ``queries.jsonl`` and ``qrels/<split>.tsv``.
        splits: Splits to load; all ``qrels/*.tsv`` files when None.

    Records need ``_id`` (a string; JSON integers are converted, with one warning per file) and
    ``text``; a document's
    ``title`` may be absent or null. Blank lines, CRLF line ends and a UTF-8 BOM are tolerated, as
    is a qrels file without its ``query-id  corpus-id  score`` header.

    Returns:
        The collection. Qrels rows naming an unknown query or document are skipped, with one
        :class:`DataWarning` per qrels file.

    Raises:
        DataError: A file is missing or malformed (message: path, line number, field), the corpus
            is empty, or a requested split has no qrels file.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    corpus_path, queries_path = root / "corpus.jsonl", root / "queries.jsonl"
    for required in (corpus_path, queries_path):
        if not required.exists() and not required.is_symlink():  # a folder or a bad link: named on reading
            raise DataError(f"{root}: missing {required.name}")

    corpus = _load_jsonl(corpus_path, "documents", _build_document)
    queries = _load_jsonl(queries_path, "queries", _build_query)
    _warn_empty(corpus_path, "documents with an empty title and text", (d.full_text for d in corpus.values()))
    _warn_empty(queries_path, "queries with an empty text", queries.values())

    qrels_dir = root / "qrels"
    available = {p.stem: p for p in qrels_dir.glob("*.tsv")} if qrels_dir.is_dir() else {}
    if isinstance(splits, str):  # a lone string is a Sequence too; treat it as one split name
        splits = [splits]
    wanted = sorted(available) if splits is None else list(dict.fromkeys(splits))
    qrels: dict[str, dict[str, dict[str, int]]] = {}
    for split in wanted:
        if split not in available:
            raise DataError(
                f"{qrels_dir}: no qrels file for split {split!r} "
                f"(available: {', '.join(sorted(available)) or 'none'})"
            )
        qrels[split] = _load_qrels(available[split], corpus, queries)
    return BeirCollection(root.name, root, corpus, queries, qrels)


def _warn_empty(path: Path, what: str, texts: Iterable[str]) -> None:
    """One warning per file counting texts that are empty (they embed as the bare special tokens)."""
    empty = sum(1 for text in texts if not text.strip())
    if empty:
        warnings.warn(f"{path}: {empty} {what}", DataWarning, stacklevel=3)


def read_queries(path: str | os.PathLike) -> dict[str, str]:
    """Read a BEIR ``queries.jsonl`` (id -> text), validated like :func:`load_collection` does."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such queries file")
    queries = _load_jsonl(path, "queries", _build_query)
    _warn_empty(path, "queries with an empty text", queries.values())
    return queries


def _load_jsonl(path: Path, what: str, build: Callable[[dict[str, Any], str], _T]) -> dict[str, _T]:
    """Map each record's ``_id`` to ``build(record, where)``, rejecting bad or repeated ids.

    An ``_id`` written as a JSON integer is read as its decimal string, with one warning for the file.
    """
    items: dict[str, _T] = {}
    ids = NumericIds()
    for lineno, record in iter_json_objects(path):
        where = f"{path} line {lineno}"
        key = ids.field(record, "_id", where)
        if key in items:
            raise DataError(f'{where}: duplicate "_id" {key!r}')
        items[key] = build(record, where)
    if not items:
        raise DataError(f"{path}: no {what}")
    ids.warn(path)
    return items


def _build_document(record: dict[str, Any], where: str) -> Document:
    title = string_field(record, "title", where) or ""
    return Document(title, string_field(record, "text", where, required=True))


def _build_query(record: dict[str, Any], where: str) -> str:
    return string_field(record, "text", where, required=True)


def _load_qrels(
    path: Path, corpus: Mapping[str, Document], queries: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    qrels: dict[str, dict[str, int]] = {}
    skipped, negative, example, first = 0, 0, "", True
    for lineno, line in iter_lines(path):
        row = line.split("\t")
        if len(row) != 3:
            raise DataError(
                f"{path} line {lineno}: expected 3 tab-separated columns "
                f"(query-id, corpus-id, score), got {len(row)}"
            )
        query_id, doc_id, score_text = row
        try:
            score = int(score_text)
        except ValueError:
            if first:  # the header row (BEIR writes one; some copies do not)
                first = False
                continue
            raise DataError(
                f'{path} line {lineno}: field "score" is not an integer: {score_text!r}'
            ) from None
        first = False
        for field, value in (("query-id", query_id), ("corpus-id", doc_id)):
            if not value.strip():
                raise DataError(f'{path} line {lineno}: field "{field}" is empty')
        if query_id not in queries or doc_id not in corpus:
            skipped += 1
            if not example:
                field, value = ("query-id", query_id) if query_id not in queries else ("corpus-id", doc_id)
                example = f'{field} "{value}" on line {lineno}'
            continue
        if score < 0:  # BEIR (pytrec_eval) counts scores <= 0 as not relevant; a negative gain would not
            negative += 1
            score = 0
        judged = qrels.setdefault(query_id, {})
        if judged.get(doc_id, score) != score:  # before, the last row silently won
            raise DataError(
                f"{path} line {lineno}: query {query_id!r} and document {doc_id!r} are judged again, "
                f"with score {score} after {judged[doc_id]}: keep one row per pair"
            )
        judged[doc_id] = score
    if negative:
        warnings.warn(
            f"{path}: {negative} qrels rows have a negative score; as in BEIR they count as not relevant "
            "(score 0)",
            DataWarning,
            stacklevel=3,
        )
    if skipped:
        warnings.warn(
            f"{path}: skipped {skipped} qrels rows naming an unknown query or document (e.g. {example})",
            DataWarning,
            stacklevel=3,
        )
    if not any(score > 0 for judged in qrels.values() for score in judged.values()):
        # Every metric would be 0 for every query, a silent wrong answer.
        raise DataError(
            f"{path}: no relevant judgement (no row with a score above 0 for a known query and "
            "document): nothing to evaluate or train on"
        )
    return qrels


def resolve_data(
    name_or_path: str,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
    *,
    source: DownloadSource = BEIR_SOURCE,
) -> Path:
    """Find a BEIR collection folder, downloading it into the cache when needed.

    Looks, in order, at: ``name_or_path`` as a directory; ``<data_dir>/<name>`` (``data_dir``
    defaults to ``$SBMOE_DATA_DIR``); ``<cache_dir>/<name>`` (``cache_dir`` defaults to
    ``$SBMOE_CACHE_DIR/data``, else ``~/.cache/sbmoe/data``). Failing those, a known BEIR name is
    downloaded, checked against its published MD5 and extracted into ``<cache_dir>/<name>``.
    ``irds:<id>`` (e.g. ``irds:beir/scifact/test``) is read through ir_datasets, which downloads by
    its own rules, and exported once into ``<cache_dir>/irds`` (see :mod:`sbmoe.data.irds`).

    Args:
        name_or_path: A directory, a collection name such as ``"scifact"``, or ``irds:<id>``.
        data_dir: Folder of local collections.
        cache_dir: Folder for downloaded collections.
        download: Whether a missing known collection may be downloaded.
        source: Where known collections are downloaded from, and their archives' MD5 (default: the
            BEIR archives).

    Raises:
        DataError: Not found and not downloadable (unknown name, download off, network failure,
            checksum mismatch, bad archive); the message lists the places searched.
    """
    checksums = source.checksums
    cache = cache_root("data") if cache_dir is None else Path(cache_dir).expanduser()
    if is_irds_name(name_or_path):
        return export_irds(name_or_path, cache / "irds")
    candidate = Path(name_or_path).expanduser()
    if candidate.is_dir():
        return candidate
    searched = [candidate]
    if data_dir is None:
        data_dir = os.environ.get("SBMOE_DATA_DIR") or None
    if data_dir is not None:
        searched.append(Path(data_dir).expanduser() / name_or_path)
    searched.append(cache / name_or_path)
    for place in searched[1:]:
        if place.is_dir():
            return place

    where = ", ".join(dict.fromkeys(str(p.absolute()) for p in searched))
    if name_or_path not in checksums:
        raise DataError(
            f"collection {name_or_path!r} not found (searched: {where}); "
            f"known BEIR collections that can be downloaded: {', '.join(sorted(checksums))}"
        )
    if not download:
        raise DataError(f"collection {name_or_path!r} not found (searched: {where}) and download is off")
    url = source.url_template.format(name=name_or_path)
    try:
        return download_collection(name_or_path, url, checksums[name_or_path], cache, source.timeout)
    # URLError, HTTPError and timeouts are OSErrors; a connection cut mid-body is an HTTPException.
    except (OSError, http.client.HTTPException, zipfile.BadZipFile, DataError) as exc:
        raise DataError(
            f"collection {name_or_path!r} not found locally (searched: {where}) "
            f"and could not be downloaded from {url}: {exc}"
        ) from exc


def positive_pairs(qrels: Mapping[str, Mapping[str, int]], min_score: int = 1) -> list[tuple[str, str]]:
    """(query id, doc id) for each judgement with score >= ``min_score``, sorted by query then doc."""
    return sorted(
        (qid, doc_id) for qid, docs in qrels.items() for doc_id, score in docs.items() if score >= min_score
    )


def train_dev_split(
    collection: BeirCollection,
    train_split: str = "train",
    dev_split: str | None = "dev",
    dev_fraction: float = 0.1,
    seed: int = 42,
) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """Qrels for training and for model selection, with no query in both.

    Uses the collection's ``dev_split`` when it has one; otherwise (or when ``dev_split`` is None)
    holds out a seeded random ``dev_fraction`` of the training queries, at least one.

    Args:
        collection: The loaded collection.
        train_split: Split to train on.
        dev_split: Split to validate on, if the collection has it.
        dev_fraction: Share of training queries held out when there is no dev split.
        seed: Seed of the hold-out draw; the same seed gives the same split.

    Returns:
        (train qrels, dev qrels), as fresh dicts the caller may modify.

    Raises:
        DataError: ``train_split`` is missing, or has too few queries to hold any out.
        ValueError: ``dev_fraction`` is not strictly between 0 and 1.
    """
    train = {qid: dict(docs) for qid, docs in collection.split_qrels(train_split).items()}
    if dev_split is not None and dev_split in collection.qrels:
        dev = {qid: dict(docs) for qid, docs in collection.split_qrels(dev_split).items()}
        overlap = train.keys() & dev.keys()
        if overlap:
            # Training on a validation query would inflate every dev score, so it leaves train.
            warnings.warn(
                f"{collection.name}: {len(overlap)} queries are in both {train_split!r} and "
                f"{dev_split!r}; they are kept in {dev_split!r} only (e.g. {min(overlap)!r})",
                DataWarning,
                stacklevel=2,
            )
            train = {qid: docs for qid, docs in train.items() if qid not in overlap}
        return train, dev
    if not 0.0 < dev_fraction < 1.0:
        raise UsageError(f"dev_fraction must be between 0 and 1, got {dev_fraction}")
    if len(train) < 2:
        raise DataError(
            f"{collection.name}: split {train_split!r} has {len(train)} queries, "
            "too few to hold out a dev set"
        )
    # Sorting first makes the draw depend on the seed only, not on the qrels file order.
    query_ids = sorted(train)
    n_dev = min(len(query_ids) - 1, max(1, round(len(query_ids) * dev_fraction)))
    held_out = set(random.Random(seed).sample(query_ids, n_dev))
    dev = {qid: train.pop(qid) for qid in query_ids if qid in held_out}
    return train, dev
