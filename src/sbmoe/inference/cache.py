"""A disk cache of pooled backbone embeddings (the MoE head's input).

Entries are keyed by the backbone's weights, pooling, token limit and text normalisation, the
precision, and a hash of the exact texts, so a changed input makes a new key. Each entry is an
``.npy`` file written atomically (a half-written entry never carries the final name) and read back
memory-mapped.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sbmoe.core.io import atomic_open, cache_root, naming_a_full_disk

# Part of every key; bumped whenever encoding's numerics change, so older entries are not reused
# (2: bf16 encoding runs on bf16 weights instead of autocast).
CACHE_VERSION = 2

if TYPE_CHECKING:
    from sbmoe.model.retriever import Retriever


def default_cache_dir() -> Path:
    """``$SBMOE_CACHE_DIR/embeddings``, else ``~/.cache/sbmoe/embeddings``."""
    return cache_root("embeddings")


def texts_digest(texts: Sequence[str]) -> str:
    """SHA-256 of the texts in order (length-prefixed, so boundaries count)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


class EmbeddingCache:
    """Pooled embeddings on disk, one ``<key>.npy`` per (backbone, settings, texts).

    Args:
        directory: Where entries live; created on first write.
    """

    def __init__(self, directory: str | os.PathLike | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_cache_dir()
        self.hits = 0
        self.misses = 0

    def key(self, retriever: Retriever, texts: Sequence[str], kind: str, precision: str) -> str:
        """The entry name for ``texts`` of ``kind`` pooled by ``retriever`` at ``precision``."""
        parts = [
            f"v{CACHE_VERSION}",
            retriever.encoder_fingerprint(kind),
            kind,
            precision,
            texts_digest(texts),
        ]
        return hashlib.sha256("|".join(parts).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npy"

    def get(self, key: str, rows: int) -> np.ndarray | None:
        """The cached array, or ``None`` when absent or unreadable (a damaged entry is removed)."""
        path = self.path(key)
        if not path.exists():
            self.misses += 1
            return None
        try:
            array = np.load(path, mmap_mode="r")
        except (OSError, ValueError):
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        if array.ndim != 2 or array.shape[0] != rows:
            path.unlink(missing_ok=True)
            self.misses += 1
            return None
        self.hits += 1
        return array

    def put(self, key: str, array: np.ndarray) -> None:
        """Store ``array`` under ``key`` atomically."""
        array = np.ascontiguousarray(array, dtype=np.float32)
        # A --cache-dir may be on another disk than the output: a full one is named as the cache's
        # (an index's own chunks, beside its output, are the output's).
        beside_output = re.fullmatch(r"\..+\.chunks", self.directory.name)
        full_disk = (
            contextlib.nullcontext() if beside_output else naming_a_full_disk(self.path(key), "--cache-dir")
        )
        with full_disk, atomic_open(self.path(key), "wb") as handle:
            # np.save's own C write reports a full disk as "N requested and M written", without
            # errno; Python's write raises OSError(ENOSPC), which the job names in one line.
            np.lib.format.write_array_header_1_0(handle, np.lib.format.header_data_from_array_1_0(array))
            handle.write(memoryview(array).cast("B"))
