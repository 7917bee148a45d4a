"""Store URIs: which vector database, where, and which collection (see :mod:`sbmoe.retrieval.milvus`)."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from sbmoe.core.errors import UsageError
from sbmoe.core.layouts import STORE_FILES

SCHEMES = ("milvus",)
DEFAULT_COLLECTION = "sbmoe"
STORE_EXTRA = "store"
# Milvus's rule for collection names: a letter or underscore, then letters, digits, underscores.
_COLLECTION_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")
_QUERY_KEYS = {"collection", "tls", "shards", "replicas", "timeout"}
_SERVER_ONLY = ("tls", "shards", "replicas", "timeout")
# Seconds a server has to answer one request (flushes and index builds are polled request by
# request, so they may take longer in all); ?timeout=SECONDS changes it.
DEFAULT_TIMEOUT = 120.0


@dataclass(frozen=True)
class StoreURI:
    """A parsed store URI.

    Attributes:
        text: The URI as given.
        engine: ``milvus``.
        path: Milvus Lite: the local database file; ``None`` for a server.
        address: A server: ``http(s)://HOST:PORT``; ``None`` for Milvus Lite.
        database: A server's database (``None``: the default one).
        collection: The collection holding the documents.
        shards: A server: shards a new collection is created with (Milvus spreads writes over them).
        replicas: A server: in-memory replicas the collection is loaded with (spreads searches).
        timeout: A server: seconds it has to answer each request before sbmoe gives up on it.
    """

    text: str
    engine: str
    path: str | None
    address: str | None
    database: str | None
    collection: str
    shards: int | None = None
    replicas: int | None = None
    timeout: float = DEFAULT_TIMEOUT

    @property
    def is_embedded(self) -> bool:
        """Whether the store is an embedded (Milvus Lite) file rather than a server."""
        return self.path is not None


def is_store_uri(value: object) -> bool:
    """Whether ``value`` names a store (``milvus:...``) rather than a FAISS index directory."""
    return isinstance(value, str) and value.split(":", 1)[0].lower() in SCHEMES and ":" in value


def parse_store_uri(text: str) -> StoreURI:
    """Parse a store URI (see the module docstring).

    Raises:
        UsageError: not a store URI, an unknown query parameter, a bad collection name, or a Milvus
            Lite path that does not end in ``.db``.
    """
    if not is_store_uri(text):
        raise UsageError(f"{text!r} is not a store URI; expected milvus:PATH.db or milvus://HOST:PORT")
    parts = urlsplit(text)
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - _QUERY_KEYS)
    if unknown:
        known = ", ".join(sorted(_QUERY_KEYS))
        raise UsageError(f"store URI {text!r}: unknown parameter {unknown[0]!r}; known: {known}")
    collection = query.get("collection", [DEFAULT_COLLECTION])[-1]
    if not _COLLECTION_NAME.fullmatch(collection):
        raise UsageError(
            f"store URI {text!r}: collection {collection!r} must start with a letter or underscore and "
            f"hold only letters, digits and underscores"
        )
    if parts.netloc:  # milvus://HOST:PORT[/DATABASE]
        scheme = "https" if query.get("tls", ["0"])[-1] in ("1", "true", "yes") else "http"
        try:
            port = parts.port or 19530
        except ValueError:
            raise UsageError(f"store URI {text!r}: the port must be a number") from None
        counts = {key: _positive(text, key, query[key][-1]) for key in ("shards", "replicas") if key in query}
        timeout = _seconds(text, query["timeout"][-1]) if "timeout" in query else DEFAULT_TIMEOUT
        address = f"{scheme}://{parts.hostname or ''}:{port}"
        database = parts.path.strip("/") or None
        return StoreURI(text, "milvus", None, address, database, collection, **counts, timeout=timeout)
    path = parts.path
    if not path.endswith(STORE_FILES.suffix):
        raise UsageError(
            f"store URI {text!r}: a Milvus Lite database is a path ending in .db (e.g. milvus:runs/corpus.db)"
        )
    for key in _SERVER_ONLY:
        if key in query:
            raise UsageError(f"store URI {text!r}: {key} applies to a server (milvus://HOST:PORT), not files")
    return StoreURI(text, "milvus", os.path.abspath(path), None, None, collection)


def _positive(text: str, key: str, value: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise UsageError(f"store URI {text!r}: {key} must be a positive integer, got {value!r}")
    return int(value)


def _seconds(text: str, value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise UsageError(f"store URI {text!r}: timeout must be a positive number of seconds, got {value!r}")
    return seconds


def missing_extra_message(package: str) -> str:
    """The one line that tells a user without the ``store`` extra what to install."""
    return (
        f"vector stores need the {package} package: install the {STORE_EXTRA!r} extra with "
        f"`pip install 'sbmoe[{STORE_EXTRA}]'`"
    )
