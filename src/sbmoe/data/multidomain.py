"""The Multi-Domain Benchmark (Bassani et al., CIKM 2022) converted to BEIR folders.

The SB-MoE study evaluates on two of its collections, Political Science and Computer Science.

The release, as found while writing this module:

* Archives ``computer_science.zip``, ``physics.zip``, ``political_science.zip`` and
  ``psychology.zip`` in Zenodo record 6606557 (https://zenodo.org/record/6606557, DOI
  10.5281/zenodo.6606557), linked from the README of GitHub ``AmenRa/a-multi-domain-benchmark-for-
  personalized-search-evaluation``; the ``download.sh`` of ``AmenRa/amdbfpse-baselines`` fetches
  ``https://zenodo.org/record/6606557/files/<fos>.zip`` and extracts each into
  ``datasets/<fos>/``.
* Each collection folder holds ``collection.jsonl`` and ``train/``, ``val/``, ``test/`` folders,
  each with ``queries.jsonl`` (``val`` and ``test`` also hold ``qrels.json``, ``bm25_run.json`` and
  ``query_ids.txt``), plus metadata files for personalisation (authors, references, venues...).
  Plain JSON Lines, one object a line, no compression inside the archives.
* ``collection.jsonl`` records: ``id``, ``title``, ``text`` (the abstract), then ``keywords``,
  ``fields_of_study``, ``publication_date`` and other metadata.
* ``queries.jsonl`` records: ``id``, ``text`` (the query), ``rel_doc_ids`` (relevant document ids),
  then ``user_id``, ``user_doc_ids``, ``bm25_doc_ids``, ``bm25_doc_scores``, ``timestamp``. The
  release's own ``qrels.json`` is ``{query id: {doc id: 1}}`` built from ``rel_doc_ids``, so binary
  relevance 1 is what the benchmark means.
* ``val`` is a random 1% of the training queries (``finalize_data/1_split_queries.py`` in the
  benchmark repository), and only test queries with at least 10 relevant documents are kept. The
  SB-MoE authors' ``data_preprocessing.py`` (repository DenseRetrievalMoE) reads
  ``multi-domain/<fos>/collection.jsonl`` and ``<fos>/{train,test}/queries.jsonl``, renames ``id``
  to ``_id`` and writes ``rel_doc_ids`` as score-1 qrels, as done here.

Only the retrieval fields are converted; the personalisation metadata is left behind.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sbmoe.core.errors import DataError, DataWarning
from sbmoe.core.io import atomic_directory, atomic_open
from sbmoe.data.readers import NumericIds, iter_json_objects, json_type, string_field

ZENODO_RECORD = "https://zenodo.org/record/6606557"

COLLECTION_FILE = "collection.jsonl"
# BEIR split -> the release's query file, relative to the collection folder.
QUERY_FILES: dict[str, str] = {
    "train": "train/queries.jsonl",
    "dev": "val/queries.jsonl",
    "test": "test/queries.jsonl",
}


@dataclass(frozen=True)
class MultiDomainSource:
    """Where one collection of the release lives and how its files are named.

    Attributes:
        folder: Folder the Zenodo archive extracts to (e.g. ``political_science``).
        archive_url: The archive on Zenodo.
        collection_file: The documents, relative to ``folder``.
        query_files: BEIR split -> query file, relative to ``folder`` (``val`` becomes ``dev``).
    """

    folder: str
    archive_url: str
    collection_file: str = COLLECTION_FILE
    query_files: Mapping[str, str] = field(default_factory=lambda: dict(QUERY_FILES))


MULTIDOMAIN_COLLECTIONS: dict[str, MultiDomainSource] = {
    "political-science": MultiDomainSource(
        folder="political_science", archive_url=f"{ZENODO_RECORD}/files/political_science.zip"
    ),
    "computer-science": MultiDomainSource(
        folder="computer_science", archive_url=f"{ZENODO_RECORD}/files/computer_science.zip"
    ),
}


def convert_multidomain(
    source_dir: str | os.PathLike, target_dir: str | os.PathLike, name: str | None = None
) -> Path:
    """Convert one Multi-Domain Benchmark collection into a BEIR folder.

    Writes ``corpus.jsonl`` (``_id``, ``title``, ``text``), ``queries.jsonl`` (``_id``, ``text``; the
    queries of all splits) and ``qrels/train.tsv``, ``qrels/dev.tsv`` (from ``val``) and
    ``qrels/test.tsv`` (header ``query-id  corpus-id  score``, score 1 for each relevant document).
    The target folder appears complete or not at all; an existing one is replaced only on success.
    Each file may also be gzip-compressed (``collection.jsonl.gz`` etc.); the release itself is
    plain JSON Lines. Documents are streamed, so only the ids are held in memory.

    Args:
        source_dir: The extracted collection folder (holding ``collection.jsonl``), or, with
            ``name``, the folder the archives were extracted into (holding ``political_science/``...).
        target_dir: The BEIR folder to write; its name becomes the collection name when loaded.
        name: A key of :data:`MULTIDOMAIN_COLLECTIONS` (``"political-science"``,
            ``"computer-science"``; the underscore spelling works too). When given,
            ``source_dir/<folder>`` is used if it exists, else ``source_dir`` itself.

    Returns:
        ``target_dir`` as a Path.

    Raises:
        DataError: Unknown name; a missing file; a malformed line, a missing or mistyped ``id``,
            ``title``, ``text`` or ``rel_doc_ids``, or a repeated id (message: file, line, field);
            an empty collection or query file; a target that is the source or contains it.
            Relevant-document ids not in the collection are skipped instead, with one
            :class:`~sbmoe.data.beir.DataWarning` per query file.
    """
    source = _source_folder(Path(source_dir), name)
    target = Path(target_dir)
    layout = _layout(name)
    collection_path = _find_file(source, layout.collection_file)
    query_paths = {split: _find_file(source, rel) for split, rel in layout.query_files.items()}

    resolved_target, resolved_source = target.resolve(), source.resolve()
    if resolved_target == resolved_source or resolved_target in resolved_source.parents:
        raise DataError(f"{target}: the target would replace the source folder {source}")

    with atomic_directory(target) as staging:
        with atomic_open(staging / "corpus.jsonl") as out:
            doc_ids = _convert_documents(collection_path, out)
        seen_queries: dict[str, str] = {}
        with atomic_open(staging / "queries.jsonl") as queries_out:
            for split, path in query_paths.items():
                with atomic_open(staging / "qrels" / f"{split}.tsv") as qrels_out:
                    qrels_out.write("query-id\tcorpus-id\tscore\n")
                    _convert_queries(path, doc_ids, seen_queries, queries_out, qrels_out)
    return target


# --------------------------------------------------------------------------------------------------
# internals


def _layout(name: str | None) -> MultiDomainSource:
    if name is None:
        return MultiDomainSource(folder="", archive_url="")
    key = name.strip().lower().replace("_", "-")
    if key not in MULTIDOMAIN_COLLECTIONS:
        raise DataError(
            f"unknown Multi-Domain Benchmark collection {name!r} "
            f"(known: {', '.join(sorted(MULTIDOMAIN_COLLECTIONS))})"
        )
    return MULTIDOMAIN_COLLECTIONS[key]


def _source_folder(source_dir: Path, name: str | None) -> Path:
    if not source_dir.is_dir():
        raise DataError(f"{source_dir}: not a directory")
    if name is not None:
        nested = source_dir / _layout(name).folder
        if nested.is_dir():
            return nested
    return source_dir


def _find_file(folder: Path, relative: str) -> Path:
    """``folder/relative``, or its ``.gz`` twin when only that exists."""
    plain = folder / relative
    packed = plain.with_name(plain.name + ".gz")
    for candidate in (plain, packed):
        if candidate.is_file():
            return candidate
    raise DataError(f"{folder}: missing {relative} (or {relative}.gz)")


def _identified_records(path: Path, ids: NumericIds) -> Iterator[tuple[int, str, str, dict[str, Any]]]:
    """(line, where, id, record) for each record of a release file (``where``: path and line)."""
    for lineno, record in iter_json_objects(path):
        where = f"{path} line {lineno}"
        yield lineno, where, _single_line(ids.field(record, "id", where), where, "id"), record


def _single_line(value: str, where: str, field_name: str) -> str:
    if any(char in value for char in "\t\r\n"):
        # Qrels are tab-separated lines, so such an id could not be written back faithfully.
        raise DataError(f'{where}: field "{field_name}" contains a tab or line break: {value!r}')
    return value


def _convert_documents(path: Path, out: IO[str]) -> set[str]:
    """Write each document of ``collection.jsonl`` as a BEIR corpus line; return the ids."""
    first_line: dict[str, int] = {}
    for lineno, where, doc_id, record in _identified_records(path, NumericIds()):
        if doc_id in first_line:
            raise DataError(f'{where}: duplicate "id" {doc_id!r} (first on line {first_line[doc_id]})')
        first_line[doc_id] = lineno
        title = string_field(record, "title", where) or ""
        text = string_field(record, "text", where, required=True)
        out.write(json.dumps({"_id": doc_id, "title": title, "text": text}, ensure_ascii=False) + "\n")
    if not first_line:
        raise DataError(f"{path}: no documents")
    return set(first_line)


def _convert_queries(
    path: Path, doc_ids: set[str], seen: dict[str, str], queries_out: IO[str], qrels_out: IO[str]
) -> None:
    """Append the queries of one split to ``queries_out`` and their judgements to ``qrels_out``.

    ``seen`` maps each query id already written to where it was read, across all splits.
    """
    count, skipped, emptied, example = 0, 0, 0, ""
    ids = NumericIds()
    for lineno, where, query_id, record in _identified_records(path, ids):
        if query_id in seen:
            raise DataError(f'{where}: duplicate "id" {query_id!r} (first in {seen[query_id]})')
        seen[query_id] = where
        text = string_field(record, "text", where, required=True)
        if "rel_doc_ids" not in record:
            raise DataError(f'{where}: missing field "rel_doc_ids"')
        relevant = record["rel_doc_ids"]
        if not isinstance(relevant, list):
            raise DataError(f'{where}: field "rel_doc_ids" must be an array, got {json_type(relevant)}')
        known: dict[str, None] = {}  # ordered set: a repeated id is one judgement
        for index, value in enumerate(relevant):
            label = f"rel_doc_ids[{index}]"
            doc_id = _single_line(ids.read(value, where, label), where, label)
            if doc_id in doc_ids:
                known[doc_id] = None
            else:
                skipped += 1
                example = example or f'"{doc_id}" on line {lineno}'
        if relevant and not known:
            emptied += 1
        queries_out.write(json.dumps({"_id": query_id, "text": text}, ensure_ascii=False) + "\n")
        qrels_out.writelines(f"{query_id}\t{doc_id}\t1\n" for doc_id in known)
        count += 1
    if not count:
        raise DataError(f"{path}: no queries")
    if skipped:
        left = f"; {emptied} queries are left without a relevant document" if emptied else ""
        warnings.warn(
            f"{path}: skipped {skipped} relevant-document ids not in the collection (e.g. {example}){left}",
            DataWarning,
            stacklevel=3,
        )
