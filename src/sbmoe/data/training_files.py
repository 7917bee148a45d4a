"""Training files (Tevatron JSONL, triples as TSV or JSONL, Hugging Face datasets) read as a collection.

:func:`load_training_file` turns a file into the structure training reads from a BEIR folder: the
queries, a corpus of the file's passages, ``train`` qrels (each query's positives, score 1), and the
negatives the file lists per query, which training uses as its hard negatives. Accepted:

- Tevatron JSONL: ``{"query_id"?, "query", "positive_passages": [{"docid"?, "title"?, "text"}],
  "negative_passages"?: [...]}``.
- Triples as JSONL: ``{"query" or "anchor", "positive", "negative"?}``, ``positive`` and
  ``negative`` a string or a list of strings; ``negative_1``, ``negative_2``, ... (the n-tuples
  sentence-transformers writes) are negatives too.
- Triples as TSV: ``query<TAB>positive[<TAB>negative...]``, with or without a header line.
- A Hugging Face dataset saved with ``save_to_disk`` (a ``DatasetDict``: its ``train`` split) whose
  rows are triples or Tevatron records; reading it needs ``datasets`` (``pip install 'sbmoe[hf]'``).

A ``.tsv`` file is TSV, a ``.jsonl`` or ``.json`` file JSONL, any other file is told by its first
line, a folder is a dataset. A JSONL file or dataset is Tevatron when its first record has
``positive_passages``. Every line or row is validated; an error names the file, the line (or the
row, counted from 0) and the field. A query is known by its ``query_id`` or else its text, so lines
repeating a query add to one query; a passage by its ``docid`` or else its title and text, so an
identical passage is one document. Ids made from texts are stable digests (``q``/``d`` + 16 hex
digits of SHA-1).
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbmoe.config.train import TrainConfig
from sbmoe.core.errors import DataError, DataWarning, MissingInputError, UsageError, first_line
from sbmoe.data.beir import BeirCollection, Document
from sbmoe.data.readers import NumericIds, iter_json_objects, iter_lines, json_type, string_field

_NEGATIVE_COLUMN = re.compile(r"negative_(\d+)")
_QUERY_FIELDS = ("query", "anchor")


@dataclass
class TrainingFileCollection(BeirCollection):
    """A training file read as a collection (its only split is ``train``).

    Attributes:
        negatives: Query id -> the doc ids the file lists as its negatives, in file order (never
            one of the query's positives).
    """

    negatives: dict[str, list[str]] = field(default_factory=dict)


def training_collection(config: TrainConfig, collection: BeirCollection | None) -> BeirCollection:
    """What a run trains on: ``collection``, or the file ``config.train_file`` names.

    Raises:
        UsageError: Both or neither are given.
    """
    if config.train_file is None:
        if collection is None:
            raise UsageError(
                "nothing to train on: give a collection (--data) or a training file (--train-file)"
            )
        return collection
    if collection is not None:
        raise UsageError(
            f"train on a collection ({collection.name}, --data) or a training file ({config.train_file}, "
            "--train-file), not both: dev queries are held out of the training file"
        )
    return load_training_file(config.train_file)


def load_training_file(path: str | os.PathLike) -> TrainingFileCollection:
    """Read and validate a training file (see the module docstring for the formats).

    Raises:
        MissingInputError: ``path`` does not exist.
        DataError: A line or row is malformed (message: path, line or row, field), a passage id
            names two different passages, or the file holds no example.
        UsageError: A dataset folder, and ``datasets`` is not installed.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise MissingInputError(f"{path}: no such training file or folder")
    builder = _Builder(path)
    for where, record in _records(path):
        builder.add(where, record)
    return builder.collection()


def _records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """(location for messages, record) for each example, whatever the format."""
    if path.is_dir():
        if (path / "corpus.jsonl").is_file():
            raise DataError(f"{path} is a BEIR folder: train on it with --data, not --train-file")
        yield from _dataset_rows(path)
    elif _is_tsv(path):
        yield from _tsv_records(path)
    else:
        for lineno, record in iter_json_objects(path):
            yield f"{path} line {lineno}", record


def _is_tsv(path: Path) -> bool:
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".jsonl", ".json"):
        return suffix == ".tsv"
    return not next((line.lstrip().startswith("{") for _, line in iter_lines(path)), False)


def _tsv_records(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    first = True
    for lineno, line in iter_lines(path):
        cells = line.split("\t")
        while len(cells) > 2 and not cells[-1].strip():
            cells.pop()  # trailing tabs, as some exports leave them
        names = [cell.strip().lower() for cell in cells[:2]]
        header = first and names[0] in _QUERY_FIELDS and names[1:] == ["positive"]
        first = False
        if header:
            continue
        if len(cells) < 2:
            raise DataError(
                f"{path} line {lineno}: expected tab-separated query, positive and optional negatives, "
                f"got {len(cells)} column"
            )
        yield f"{path} line {lineno}", {"query": cells[0], "positive": cells[1], "negative": cells[2:]}


def _dataset_rows(path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    try:
        import datasets
    except ImportError as error:
        raise UsageError(
            f"{path}: reading a Hugging Face dataset needs datasets: pip install 'sbmoe[hf]'"
        ) from error
    try:
        dataset = datasets.load_from_disk(str(path))
    except (OSError, ValueError) as error:  # FileNotFoundError when the folder holds no dataset
        raise DataError(f"{path}: not a dataset saved with save_to_disk ({first_line(error)})") from error
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset and len(dataset) != 1:
            raise DataError(f"{path}: no 'train' split among {sorted(dataset)}: give one split's folder")
        dataset = dataset["train"] if "train" in dataset else next(iter(dataset.values()))
    for row, record in enumerate(dataset):
        yield f"{path} row {row}", record


def _digest(prefix: str, *parts: str) -> str:
    return prefix + hashlib.sha1("\x00".join(parts).encode("utf-8"), usedforsecurity=False).hexdigest()[:16]


class _Builder:
    """Collects queries, passages, positives and negatives, record by record."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.tevatron: bool | None = None  # decided by the first record
        self.queries: dict[str, str] = {}
        self.corpus: dict[str, Document] = {}
        self.positives: dict[str, dict[str, int]] = {}
        self.negatives: dict[str, dict[str, None]] = {}  # ordered sets
        self.ids = NumericIds()

    def add(self, where: str, record: dict[str, Any]) -> None:
        if self.tevatron is None:
            self.tevatron = "positive_passages" in record
        if self.tevatron:
            query_id = self.ids.field(record, "query_id", where, required=False)
            query = _text_field(record, "query", where)
            positives = self._passages(record, "positive_passages", where, required=True)
            negatives = self._passages(record, "negative_passages", where, required=False)
        else:
            present = [name for name in _QUERY_FIELDS if name in record]
            if len(present) != 1:
                problem = "has both" if present else "has neither"
                raise DataError(f'{where}: the record {problem} field "query" and field "anchor"')
            query_id, query = None, _text_field(record, present[0], where)
            positives = [self._passage("", text) for text in _texts(record, "positive", where, True)]
            columns = sorted(
                (int(match.group(1)), name) for name in record if (match := _NEGATIVE_COLUMN.fullmatch(name))
            )
            negatives = [
                self._passage("", text)
                for name in ("negative", *(name for _, name in columns))
                for text in _texts(record, name, where, False)
            ]
        query_id = query_id or _digest("q", query)
        if self.queries.setdefault(query_id, query) != query:
            raise DataError(
                f'{where}: field "query_id" {query_id!r} had another query text earlier in the file'
            )
        self.positives.setdefault(query_id, {}).update(dict.fromkeys(positives, 1))
        self.negatives.setdefault(query_id, {}).update(dict.fromkeys(negatives))

    def _passages(self, record: dict[str, Any], name: str, where: str, required: bool) -> list[str]:
        """The doc ids of the Tevatron passage list ``name``."""
        value = record.get(name)
        if value is None and not required:
            return []
        if value is None and name not in record:
            raise DataError(f'{where}: missing field "{name}"')
        if not isinstance(value, list) or not all(isinstance(item, dict) for item in value):
            raise DataError(f'{where}: field "{name}" must be a list of objects, got {json_type(value)}')
        if required and not value:
            raise DataError(f'{where}: field "{name}" is empty')
        doc_ids = []
        for position, item in enumerate(value):
            label = f"{name}[{position}]"
            title = string_field(item, "title", where, within=label) or ""
            text = string_field(item, "text", where, within=label, required=True)
            if not Document(title, text).full_text:
                raise DataError(f'{where}: field "{label}" has an empty title and text')
            doc_id = self.ids.field(item, "docid", where, within=label, required=False)
            doc_ids.append(self._passage(title, text, doc_id, where))
        return doc_ids

    def _passage(self, title: str, text: str, doc_id: str | None = None, where: str = "") -> str:
        """The id of a passage, added to the corpus when new."""
        doc_id = doc_id or _digest("d", title, text)
        document = Document(title, text)
        if self.corpus.setdefault(doc_id, document) != document:
            raise DataError(
                f"{where}: docid {doc_id!r} names another passage (title or text) earlier in the file"
            )
        return doc_id

    def _content(self, doc_id: str) -> tuple[str, str]:
        document = self.corpus[doc_id]
        return document.title, document.text

    def collection(self) -> TrainingFileCollection:
        if not self.queries:
            raise DataError(f"{self.path}: no training examples")
        negatives, dropped = {}, 0
        for query_id, listed in self.negatives.items():
            # Also by content: a passage given once with a docid and once without gets two ids.
            positive_texts = {self._content(doc_id) for doc_id in self.positives[query_id]}
            kept = [
                doc_id
                for doc_id in listed
                if doc_id not in self.positives[query_id] and self._content(doc_id) not in positive_texts
            ]
            dropped += len(listed) - len(kept)
            if kept:
                negatives[query_id] = kept
        if dropped:
            warnings.warn(
                f"{self.path}: {dropped} listed negatives are also positives of their query; "
                "they count as positives only",
                DataWarning,
                stacklevel=3,
            )
        return TrainingFileCollection(
            self.path.name, self.path, self.corpus, self.queries, {"train": self.positives}, negatives
        )


def _text_field(record: dict[str, Any], name: str, where: str) -> str:
    value = string_field(record, name, where, required=True)
    if not value.strip():
        raise DataError(f'{where}: field "{name}" is empty')
    return value


def _texts(record: dict[str, Any], name: str, where: str, required: bool) -> list[str]:
    """A field holding a string or a list of strings, as a list of non-empty texts."""
    value = record.get(name)
    if value is None:
        if required:
            string_field(record, name, where, required=True)  # raises: missing or null
        return []
    items = [(name, value)] if isinstance(value, str) else None
    if isinstance(value, list):
        items = [(f"{name}[{position}]", item) for position, item in enumerate(value)]
    if items is None:
        raise DataError(
            f'{where}: field "{name}" must be a string or a list of strings, got {json_type(value)}'
        )
    if required and not items:
        raise DataError(f'{where}: field "{name}" is empty')
    for label, item in items:
        if not isinstance(item, str):
            raise DataError(f'{where}: field "{label}" must be a string, got {json_type(item)}')
        if not item.strip():
            raise DataError(f'{where}: field "{label}" is empty')
    return [item for _, item in items]
