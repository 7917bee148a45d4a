"""Document embeddings read back from an index, so a query-side head trains without encoding a corpus."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence

import numpy as np

from sbmoe.core.errors import UsageError
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.interface import open_index
from sbmoe.retrieval.milvus.uri import is_store_uri
from sbmoe.retrieval.sharded.index import ShardedIndex

# Rows converted to float32 at a time (float16 and ivf indexes hand out copies).
_ROWS_PER_READ = 65536


def stored_document_vectors(
    directory: str | os.PathLike, doc_ids: Sequence[str], expected_fingerprint: str | Sequence[str]
) -> np.ndarray:
    """The embedding an index stores for each of ``doc_ids``, in that order, as float32 ``(n, dim)``.

    Every FAISS index type keeps its vectors (``flat`` and ``hnsw`` as they are, ``ivf`` in its
    cells; ``float16`` ones rounded to half precision, as they are scored), and a sharded index
    is read one shard at a time. The index may hold more documents than asked for.

    Args:
        directory: A FAISS index or sharded index directory.
        doc_ids: The documents wanted.
        expected_fingerprint: What the index must have been built by (see
            :meth:`~sbmoe.model.retriever.Retriever.index_fingerprints`).

    Raises:
        IndexMismatchError: another model's documents are in it.
        UsageError: ``directory`` is a vector store, or a wanted document is not in the index.
    """
    if is_store_uri(directory):
        raise UsageError(
            f"{directory}: document vectors are read back from a FAISS index only; "
            "build one with `sbmoe index` or leave the option out to encode the corpus"
        )
    index = open_index(directory, expected_fingerprint)
    parts = [index] if isinstance(index, DenseIndex) else _shards(index)  # one shard in memory at a time
    wanted = {doc_id: row for row, doc_id in enumerate(doc_ids)}
    vectors = np.zeros((len(doc_ids), index.dim), dtype=np.float32)
    found = np.zeros(len(doc_ids), dtype=bool)
    for part in parts:
        part_ids = part.doc_ids
        for start in range(0, len(part), _ROWS_PER_READ):
            ids = part_ids[start : start + _ROWS_PER_READ]
            offsets = [offset for offset, doc_id in enumerate(ids) if doc_id in wanted]
            if offsets:
                rows = [wanted[ids[offset]] for offset in offsets]
                vectors[rows] = part.vectors(start, start + len(ids))[offsets]
                found[rows] = True
    if not found.all():
        missing = [doc_ids[row] for row in np.flatnonzero(~found)]
        raise UsageError(
            f"{directory} lacks {len(missing)} of the {len(doc_ids)} documents wanted "
            f"(first: {missing[0]!r}); was it built from another corpus?"
        )
    return vectors


def _shards(index: ShardedIndex) -> Iterator[DenseIndex]:
    for number in range(index.num_shards):
        yield index.shard(number)
