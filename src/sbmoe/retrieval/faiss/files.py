"""The files of an index directory: their names, the layout of sharded indexes, checked reads, checksums.

An index directory holds ``index.faiss`` (the FAISS index), ``doc_ids.json`` (the document id of
each row) and ``meta.json`` (what made it, and a checksum of the other two files: size, SHA-256 and
SHA-256 of a sample, checked on every load by size and sample and in full on request). A *sharded*
index is a directory of such directories, ``shard-00000-of-00004/`` ...
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sbmoe.core.choices import EMBEDDING_DTYPES, INDEX_TYPES
from sbmoe.core.errors import MissingInputError, SbmoeError, UsageError
from sbmoe.core.layouts import INDEX_FILES, SHARDED_INDEX_FILES

FORMAT_VERSION = 1

# The cheap check on load hashes this many blocks of this many bytes, spread over the file.
_SAMPLE_BLOCKS = 64
_SAMPLE_BYTES = 4096


class IndexMismatchError(SbmoeError, ValueError):
    """The index on disk was built from a different model's embeddings than the one in use."""

    def __init__(self, directory: str | os.PathLike, found: str, expected: str) -> None:
        self.directory = Path(directory)
        self.found = found
        self.expected = expected
        # 12 characters identify a hash; show more only if they do not tell the two apart.
        width = 12 if found[:12] != expected[:12] else max(len(found), len(expected))
        super().__init__(
            f"The index at {self.directory} was built by a different model: its fingerprint is "
            f"{found[:width]}, the current model's is {expected[:width]}. Its embeddings are not "
            f"comparable with this model's queries. Rebuild it with the current model: "
            f"`sbmoe index --model <model> ... --output {self.directory}`."
        )


def check_fingerprint(
    directory: str | os.PathLike, meta: Mapping[str, Any], expected: str | Sequence[str] | None
) -> None:
    """Refuse an index whose documents are not embedded as the querying model expects.

    Args:
        directory: The index (for the message).
        meta: Its ``meta.json`` (a store: its collection metadata).
        expected: The querying model's fingerprint, or every fingerprint it accepts, the most
            telling first (:meth:`~sbmoe.model.retriever.Retriever.index_fingerprints`): an index
            matches when the fingerprint of its builder or of its documents is among them.

    Raises:
        IndexMismatchError: it does not match.
    """
    if expected is None:
        return
    accepted = [expected] if isinstance(expected, str) else list(expected)
    held = {meta["fingerprint"], (meta.get("metadata") or {}).get("document_fingerprint")}
    if not held & set(accepted):
        raise IndexMismatchError(directory, str(meta["fingerprint"]), accepted[0])


def shard_directory(root: str | os.PathLike, shard: int, num_shards: int) -> Path:
    """Where shard ``shard`` of ``num_shards`` lives inside the sharded index ``root``."""
    return Path(root) / SHARDED_INDEX_FILES.shard_name(shard, num_shards)


def is_sharded_index(directory: str | os.PathLike) -> bool:
    """Whether ``directory`` holds shard directories (and no single index of its own)."""
    directory = Path(directory)
    if not directory.is_dir() or (directory / INDEX_FILES.meta).exists():
        return False
    return any(
        SHARDED_INDEX_FILES.shard.match(entry.name) and entry.is_dir() for entry in directory.iterdir()
    )


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The checked ``meta.json`` of an index directory; ``dtype`` is filled in for older indexes.

    Raises:
        FileNotFoundError: there is no ``meta.json``.
        ValueError: it is corrupt: not JSON, not an object, a required entry missing or unknown.
    """
    meta_path = Path(directory) / INDEX_FILES.meta
    meta = read_json_file(meta_path)
    if not isinstance(meta, dict):
        raise UsageError(f"{meta_path} is corrupt: expected a JSON object")
    missing = [key for key in ("fingerprint", "index_type", "dim", "count") if key not in meta]
    if missing:
        raise UsageError(f"{meta_path} is corrupt: missing {', '.join(missing)}")
    if not isinstance(meta["fingerprint"], str) or not meta["fingerprint"]:
        raise UsageError(f"{meta_path} is corrupt: fingerprint must be a non-empty string")
    if meta["index_type"] not in INDEX_TYPES:
        raise UsageError(f"{meta_path}: unknown index_type {meta['index_type']!r}")
    # Indexes saved before float16 storage existed have no dtype: they are float32.
    meta.setdefault("dtype", "float32")
    if meta["dtype"] not in EMBEDDING_DTYPES:
        raise UsageError(
            f"{meta_path}: unknown dtype {meta['dtype']!r}; expected one of {', '.join(EMBEDDING_DTYPES)}"
        )
    return meta


def read_doc_ids(directory: str | os.PathLike) -> tuple[str, ...]:
    """The checked document ids of an index directory, in row order."""
    ids_path = Path(directory) / INDEX_FILES.doc_ids
    raw_ids = read_json_file(ids_path)
    if not isinstance(raw_ids, list):
        raise UsageError(f"{ids_path} is corrupt: expected a JSON list of document ids")
    try:
        return check_ids(raw_ids, "doc_ids")
    except ValueError as error:
        raise UsageError(f"{ids_path} is corrupt: {error}") from None


def check_ids(ids: Sequence[str], name: str) -> tuple[str, ...]:
    """``ids`` as a tuple, checked to be unique strings; the error names them ``name``."""
    if isinstance(ids, str):
        raise UsageError(f"{name} must be a sequence of strings, not a single string")
    result = tuple(ids)
    for value in result:
        if not isinstance(value, str):
            raise UsageError(f"{name} must all be strings, found {value!r} ({type(value).__name__})")
    if len(set(result)) != len(result):
        repeated = [value for value, count in Counter(result).items() if count > 1]
        shown = ", ".join(repr(value) for value in repeated[:5])
        raise UsageError(f"{name} must be unique; {len(repeated)} repeat, e.g. {shown}")
    return result


def file_checksum(path: Path) -> dict[str, Any]:
    """Size, SHA-256 and SHA-256 of a sample (see :func:`sample_digest`) of the file at ``path``."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    size = path.stat().st_size
    return {"size": size, "sha256": digest.hexdigest(), "sample_sha256": sample_digest(path, size)}


def sample_digest(path: Path, size: int) -> str:
    """SHA-256 of ``_SAMPLE_BLOCKS`` blocks spread evenly over the file (first and last included)."""
    digest = hashlib.sha256()
    last = max(size - _SAMPLE_BYTES, 0)
    with open(path, "rb") as handle:
        for number in range(_SAMPLE_BLOCKS):
            handle.seek(last * number // (_SAMPLE_BLOCKS - 1))
            digest.update(handle.read(_SAMPLE_BYTES))
    return digest.hexdigest()


def verify_checksum(directory: str | os.PathLike, meta: Mapping[str, Any], full: bool = False) -> None:
    """Check the index files against ``meta``'s checksum: sizes and samples, or (``full``) everything.

    Raises:
        UsageError: a file differs from what was saved (damaged or replaced), naming it.
    """
    for name, expected in (meta.get("checksum") or {}).items():
        path = Path(directory) / name
        if not path.is_file():
            continue  # the loader names missing files itself
        size = path.stat().st_size
        if size != expected["size"]:
            problem = f"has {size} bytes, {INDEX_FILES.meta} says {expected['size']}"
        elif full and file_checksum(path)["sha256"] != expected["sha256"]:
            problem = "does not match the SHA-256 in " + INDEX_FILES.meta
        elif not full and sample_digest(path, size) != expected["sample_sha256"]:
            problem = "does not match the sample checksum in " + INDEX_FILES.meta
        else:
            continue
        raise UsageError(
            f"{path} is corrupt or changed since the index was saved (it {problem}); rebuild the index "
            "with `sbmoe index ...`"
        )


def read_json_file(path: Path) -> Any:
    if not path.is_file():
        raise MissingInputError(f"{path} is missing; rebuild the index with `sbmoe index ...`")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path} is corrupt: not valid JSON ({error})") from None
