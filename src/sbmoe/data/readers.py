"""Reading records from the files users give: lines, JSON Lines, and the fields of a record.

One set of readers for every format sbmoe reads (BEIR folders, the Multi-Domain release, training
files), so that an error always reads the same: the file, the line (or row) and the field, in one
line. Blank lines, CRLF line ends, a UTF-8 byte-order mark and gzip (``.gz``) are tolerated.
"""

from __future__ import annotations

import codecs
import errno
import gzip
import json
import re
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sbmoe.core.errors import DataError, DataWarning, first_line

_JSON_TYPES = {type(None): "null", bool: "boolean", int: "number", float: "number", str: "string"}


def json_type(value: Any) -> str:
    """The JSON name of ``value``'s type (string, number, array, ...), for error messages."""
    return _JSON_TYPES.get(type(value), "array" if isinstance(value, list) else "object")


def file_problem(path: Path) -> str | None:
    """Why ``path`` cannot be read as a data file (a folder, a looping or broken link...), or ``None``."""
    try:
        if path.is_dir():
            return "is a directory, not a file"
        path.stat()
    except OSError as error:
        if error.errno == errno.ELOOP:
            return "is a symbolic link that loops (it leads back to itself)"
        if path.is_symlink():
            return "is a symbolic link to nothing"
        return "does not exist" if isinstance(error, FileNotFoundError) else first_line(error)
    return None if path.is_file() else "is not a regular file"


def iter_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Yield (1-based line number, text) for each non-blank line, without BOM or line ending.

    Raises:
        DataError: ``path`` is no readable file (:func:`file_problem`), a line is not valid UTF-8,
            or a ``.gz`` file is not readable gzip.
    """
    problem = file_problem(path)
    if problem is not None:
        raise DataError(f"{path}: {problem}")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        # Binary reading with per-line decoding keeps line numbers exact even for bad UTF-8.
        with opener(path, "rb") as handle:
            for lineno, raw in enumerate(handle, start=1):
                if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
                    raw = raw[len(codecs.BOM_UTF8) :]
                try:
                    line = raw.decode("utf-8").rstrip("\r\n")
                except UnicodeDecodeError as exc:
                    raise DataError(f"{path} line {lineno}: not valid UTF-8 ({exc.reason})") from None
                if line.strip():
                    yield lineno, line
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable gzip file ({exc})") from None


def iter_json_objects(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (1-based line number, object) for each non-blank line of a JSON Lines file.

    Raises:
        DataError: A line is not valid UTF-8, not JSON, or not a JSON object (path and line named).
    """
    for lineno, line in iter_lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path} line {lineno}: invalid JSON ({exc.msg}, column {exc.colno})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {lineno}: expected a JSON object, got {json_type(record)}")
        field = _lone_surrogate_at(record) if "\\u" in line else None  # only an escape can make one
        if field is not None:
            raise DataError(
                f'{path} line {lineno}: field "{field}" holds a lone UTF-16 surrogate (a \\ud800-\\udfff '
                "escape without its pair), which is not text"
            )
        yield lineno, record


_SURROGATE = re.compile("[\ud800-\udfff]")


def _lone_surrogate_at(value: Any, label: str = "") -> str | None:
    """The field of a parsed JSON ``value`` whose name or string holds a lone surrogate, or ``None``."""
    if isinstance(value, str):
        return label if _SURROGATE.search(value) else None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        name = f"{label}[{key}]" if isinstance(key, int) else _label(key, label)
        if isinstance(key, str) and _SURROGATE.search(key):
            return name
        found = _lone_surrogate_at(item, name)
        if found is not None:
            return found
    return None


def _label(name: str, within: str) -> str:
    return f"{within}.{name}" if within else name


def string_field(
    record: dict[str, Any], name: str, where: str, *, within: str = "", required: bool = False
) -> str | None:
    """``record[name]``: a string; ``None`` when absent or null, unless ``required``.

    Args:
        where: The place for messages (``FILE line N``).
        within: The enclosing field, for messages (``positive_passages[0]``).

    Raises:
        DataError: Not a string, or ``required`` and absent or null.
    """
    value = record.get(name)
    label = _label(name, within)
    if value is None and required:
        if name in record:
            raise DataError(f'{where}: field "{label}" must be a string, got null')
        raise DataError(f'{where}: missing field "{label}"')
    if value is not None and not isinstance(value, str):
        raise DataError(f'{where}: field "{label}" must be a string, got {json_type(value)}')
    return value


class NumericIds:
    """Reads ids: strings, or JSON integers read as their decimal strings and counted.

    Some BEIR copies (and the Multi-Domain release) write numeric ids as JSON numbers; they name the
    same thing as the string. A float, boolean or anything else is an error. BEIR folders warn once
    per file with the count (:meth:`warn`), since the README promises strings there.
    """

    def __init__(self) -> None:
        self.count = 0
        self.example = ""

    def read(self, value: Any, where: str, label: str) -> str:
        """``value`` as an id: a non-empty string, or an integer converted (and counted).

        Raises:
            DataError: Anything else, or an empty string.
        """
        if isinstance(value, int) and not isinstance(value, bool):
            self.count += 1
            self.example = self.example or f'field "{label}" {value} on {where}'
            value = str(value)
        if not isinstance(value, str):
            raise DataError(f'{where}: field "{label}" must be a string, got {json_type(value)}')
        if not value.strip():
            raise DataError(f'{where}: field "{label}" is empty')
        if any(character.isspace() for character in value):  # TREC runs separate columns by whitespace
            raise DataError(
                f'{where}: field "{label}" {value!r} holds whitespace, which no TREC run (run.trec, '
                "search --output) can carry: use ids without spaces or tabs"
            )
        return value

    def field(
        self, record: dict[str, Any], name: str, where: str, *, within: str = "", required: bool = True
    ) -> str | None:
        """The id in ``record[name]`` (:meth:`read`); ``None`` if absent or null and not ``required``."""
        value = record.get(name)
        if value is None and not required:
            return None
        if name not in record:
            raise DataError(f'{where}: missing field "{_label(name, within)}"')
        return self.read(value, where, _label(name, within))

    def warn(self, path: Path) -> None:
        """One :class:`DataWarning` for ``path`` when any id was converted."""
        if self.count:
            example = self.example.replace(f" on {path} line ", " on line ")
            warnings.warn(
                f"{path}: {self.count} ids are JSON numbers, read as their decimal strings (e.g. {example})",
                DataWarning,
                stacklevel=3,
            )
