"""Sharded indexes: a directory of index directories, searched shard by shard or merged into one.

A *sharded* index is a directory of :class:`~sbmoe.retrieval.faiss.index.DenseIndex` directories,
``shard-00000-of-00004/`` ... (:func:`~sbmoe.retrieval.faiss.files.shard_directory`), each holding
one contiguous slice of the corpus and written independently (by ``sbmoe index --shard i/N`` or one
``torchrun`` process each, through :meth:`~sbmoe.retrieval.faiss.index.DenseIndex.save_shard`).
:class:`ShardedIndex` searches it shard by shard, one shard in memory at a time, and merges the
per-shard top-k lists (top-k of top-ks), which gives the same ranking as one index over the whole
corpus; :meth:`ShardedIndex.merge` builds that index.

Shards may differ in index type or embedding dtype (``float32`` / ``float16``), e.g. when some were
rebuilt with other settings: each is searched as it is, and :attr:`ShardedIndex.index_type` or
:attr:`ShardedIndex.dtype` then reads ``mixed``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sbmoe.config.jobs import IndexConfig
from sbmoe.core.errors import MissingInputError, UsageError
from sbmoe.core.layouts import SHARDED_INDEX_FILES
from sbmoe.core.runs import Run, merge_runs
from sbmoe.retrieval.faiss.files import (
    check_fingerprint,
    check_ids,
    read_doc_ids,
)
from sbmoe.retrieval.faiss.index import DenseIndex, read_meta


class ShardedIndex:
    """An index stored as consecutive shards, searched one shard at a time.

    Only one shard is in memory at a time (memory-mapped), so the whole corpus need not fit.
    Built by :meth:`DenseIndex.save_shard` (``sbmoe index --shard i/N``, or one ``torchrun``
    process per shard); use :meth:`load`.

    Attributes:
        directory: The sharded index directory.
        location: The same, as a string (:attr:`sbmoe.retrieval.interface.Index.location`).
        shard_dirs: The shard directories, in corpus order.
        fingerprint: The model fingerprint every shard carries.
        index_type: The shards' index type (``mixed`` if they differ).
        dtype: The shards' embedding dtype, ``float32`` or ``float16`` (``mixed`` if they differ).
        metadata: The first shard's caller metadata, without its ``shard`` entry.
    """

    def __init__(
        self, directory: Path, shard_dirs: list[Path], metas: list[dict[str, Any]], verify: bool = False
    ) -> None:
        self.directory = directory
        self.location: str | None = str(directory)
        self.verify = verify
        self.shard_dirs = shard_dirs
        self._metas = metas
        self.fingerprint: str = metas[0]["fingerprint"]
        types = {meta["index_type"] for meta in metas}
        self.index_type = types.pop() if len(types) == 1 else "mixed"
        dtypes = {meta["dtype"] for meta in metas}
        self.dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
        self.metadata = {k: v for k, v in (metas[0].get("metadata") or {}).items() if k != "shard"}
        self._doc_ids: tuple[str, ...] | None = None

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self._metas[0]["dim"])

    @property
    def num_shards(self) -> int:
        return len(self.shard_dirs)

    def __len__(self) -> int:
        return sum(int(meta["count"]) for meta in self._metas)

    def __repr__(self) -> str:
        return (
            f"ShardedIndex(shards={self.num_shards}, index_type={self.index_type!r}, dtype={self.dtype!r}, "
            f"count={len(self)}, dim={self.dim}, fingerprint={self.fingerprint[:12]!r})"
        )

    @property
    def doc_ids(self) -> tuple[str, ...]:
        """Document id of each row over all shards, in corpus order (read on first use)."""
        if self._doc_ids is None:
            ids = [doc_id for directory in self.shard_dirs for doc_id in read_doc_ids(directory)]
            self._doc_ids = check_ids(ids, "doc_ids of the shards")
        return self._doc_ids

    def shard(self, number: int) -> DenseIndex:
        """Load shard ``number`` (memory-mapped)."""
        return DenseIndex.load(
            self.shard_dirs[number], expected_fingerprint=self.fingerprint, verify=self.verify
        )

    def search(
        self,
        query_embeddings: np.ndarray,
        k: int,
        query_ids: Sequence[str] | None = None,
        exclude_self: bool = False,
        batch_size: int = 1024,
    ) -> Run:
        """Search every shard in turn and merge their top-``k`` lists; see :meth:`DenseIndex.search`."""
        merged: Run | None = None
        for number in range(self.num_shards):
            run = self.shard(number).search(query_embeddings, k, query_ids, exclude_self, batch_size)
            merged = run if merged is None else merge_runs([merged, run], k)
        assert merged is not None
        return merged

    def merge(self, config: IndexConfig | None = None) -> DenseIndex:
        """One index over all shards, in corpus order (what one process would have built).

        Vectors stream from the memory-mapped shards into the new index; only the new index is
        held in memory.

        Args:
            config: The merged index (see :class:`DenseIndex`): its ``index_type`` defaults to the
                shards' (``flat`` if they differ), its ``embedding_dtype`` to the shards'
                (``float32``, which holds float16 values exactly, if they differ).
        """
        config = config or IndexConfig()
        config = dataclasses.replace(
            config,
            index_type=config.index_type or (self.index_type if self.index_type != "mixed" else "flat"),
            embedding_dtype=config.embedding_dtype or (self.dtype if self.dtype != "mixed" else "float32"),
        )
        shards = [self.shard(number) for number in range(self.num_shards)]

        def chunks() -> Iterator[np.ndarray]:
            return (chunk for shard in shards for chunk in shard.iter_vectors())

        return DenseIndex.from_chunks(
            chunks,
            self.doc_ids,
            self.fingerprint,
            self.dim,
            config,
            metadata={**self.metadata, "merged_from_shards": self.num_shards},
        )

    @classmethod
    def load(
        cls,
        directory: str | os.PathLike,
        expected_fingerprint: str | Sequence[str] | None = None,
        verify: bool = False,
    ) -> ShardedIndex:
        """Open a sharded index, checking that its shards are complete and consistent.

        Reads only the shards' ``meta.json`` (and, with ``verify``, every shard's files in full
        against their checksums); the vectors are read, with a sample checksum check, when searched.

        Raises:
            FileNotFoundError: the directory holds no shards, or some are missing.
            IndexMismatchError: the shards were built by another model than ``expected_fingerprint``'s.
            ValueError: shards of different counts, models or dimensions, or gaps in the corpus.
        """
        directory = Path(directory)
        found: dict[int, tuple[int, Path]] = {}
        counts = set()
        for entry in sorted(directory.iterdir()) if directory.is_dir() else []:
            match = SHARDED_INDEX_FILES.shard.match(entry.name)
            if match and entry.is_dir():
                number, count = int(match.group(1)), int(match.group(2))
                found[number] = (count, entry)
                counts.add(count)
        if not found:
            raise MissingInputError(
                f"no index shards in {directory}; build them with `sbmoe index ... --shard i/N`"
            )
        if len(counts) > 1:
            raise UsageError(
                f"{directory} mixes shards of {sorted(counts)} shards each; delete the stale ones "
                f"(the directories shard-*-of-N of the other runs)"
            )
        num_shards = counts.pop()
        missing = [i for i in range(num_shards) if i not in found]
        if missing:
            shown = ", ".join(f"{i}/{num_shards}" for i in missing[:10])
            raise MissingInputError(
                f"{directory} lacks {len(missing)} of its {num_shards} shards ({shown}); build them with "
                f"`sbmoe index ... --output {directory} --shard i/{num_shards}`"
            )
        shard_dirs = [found[i][1] for i in range(num_shards)]
        metas = []
        for number, shard_dir in enumerate(shard_dirs):
            meta = read_meta(shard_dir)
            info = (meta.get("metadata") or {}).get("shard") or {}
            if info.get("index") != number or info.get("count") != num_shards:
                raise UsageError(
                    f"{shard_dir} does not describe shard {number} of {num_shards} in its meta.json"
                )
            metas.append(meta)
        fingerprints = {meta["fingerprint"] for meta in metas}
        if len(fingerprints) > 1:
            raise UsageError(
                f"the shards in {directory} were built by {len(fingerprints)} different models; rebuild "
                f"the stale ones with the same model"
            )
        check_fingerprint(directory, metas[0], expected_fingerprint)
        if len({meta["dim"] for meta in metas}) > 1:
            raise UsageError(f"the shards in {directory} hold vectors of different dimensions")
        infos = [meta["metadata"]["shard"] for meta in metas]
        total = infos[0].get("total")
        position = 0
        for number, (meta, info) in enumerate(zip(metas, infos, strict=True)):
            if (
                info.get("start") != position
                or info.get("stop") != position + meta["count"]
                or info.get("total") != total
            ):
                raise UsageError(
                    f"shard {number} of {directory} covers documents {info.get('start')}:{info.get('stop')} "
                    f"of {info.get('total')}, expected to start at {position} of {total}; were the shards "
                    f"built from the same corpus?"
                )
            position += meta["count"]
        if position != total:
            raise UsageError(f"the shards in {directory} hold {position} documents, the corpus has {total}")
        if verify:  # every file in full, once, here: searches then open shards with the sample check
            for shard_dir in shard_dirs:
                DenseIndex.load(shard_dir, expected_fingerprint=metas[0]["fingerprint"], verify=True)
        return cls(directory, shard_dirs, metas)
