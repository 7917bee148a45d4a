"""The store index job: encode a corpus (or a shard of it) into a vector store, resumably.

Documents go in chunks: each chunk asks the store which of its ids it already holds, encodes only
the others and upserts them by id. A killed job, run again, therefore skips what was written and
never stores a document twice; shards (``--shard I/N``, or one ``torchrun`` process each) write
disjoint slices of the same collection. On a server, a job ends once what it wrote is sealed and
indexed (:meth:`~sbmoe.retrieval.milvus.store.MilvusStore.finish`), so the searches after it use the
index.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from tqdm.auto import tqdm

from sbmoe.config.jobs import EncodeConfig, IndexConfig, JobOptions
from sbmoe.core.distributed import shard_bounds
from sbmoe.core.errors import UsageError
from sbmoe.core.io import naming_a_full_disk
from sbmoe.data.beir import BeirCollection
from sbmoe.inference.encoding import apply_head_stages, encode_pooled
from sbmoe.inference.routing import route
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.indexing import INDEX_CHUNK_SIZE, index_metadata
from sbmoe.retrieval.milvus.collection import MAX_ID_LENGTH, require_engine, store_meta
from sbmoe.retrieval.milvus.store import MilvusStore
from sbmoe.retrieval.milvus.uri import parse_store_uri


@dataclass
class StoreIndexSummary:
    """What one ``index --store`` run did.

    Attributes:
        uri: The store written.
        start: First document of the slice (position in the corpus).
        stop: End of the slice (exclusive).
        written: Documents encoded and written by this run.
        skipped: Documents of the slice already in the store (from an earlier, interrupted run).
        stored: Documents in the store now, over all shards.
        corpus: Documents in the whole corpus.
    """

    uri: str
    start: int
    stop: int
    written: int
    skipped: int
    stored: int
    corpus: int


def index_into_store(
    retriever: Retriever,
    collection: BeirCollection,
    uri: str,
    config: IndexConfig | None = None,
    encode: EncodeConfig | None = None,
    options: JobOptions | None = None,
) -> StoreIndexSummary:
    """Encode the collection's corpus (or the slice ``options.shard`` of it) into the store at ``uri``.

    The collection records the model's fingerprint, the corpus size, the index settings and, for a
    model with an MoE head, each document's top expert and gate weights.

    Args:
        uri: A store URI (:mod:`sbmoe.retrieval.milvus`).
        config: Index type (``flat``: exact, the default; ``hnsw``; ``ivf`` with ``nlist``/``nprobe``);
            ``embedding_dtype`` float16 is not offered for stores.
        options: Progress bars, the command recorded, the embedding cache, ``shard`` (``(i, N)``:
            only the ``i``-th of ``N`` consecutive slices of the corpus), and ``overwrite``:
            replace a collection written with other settings (another model, corpus or index
            type); one with the same settings is resumed either way.

    Documents are checked, encoded and written ``INDEX_CHUNK_SIZE`` at a time.

    Raises:
        IndexMismatchError: the collection holds another model's vectors (without ``overwrite``).
        UsageError: unusable settings, or a document id longer than the store accepts.
    """
    options = options or JobOptions()
    config = config or IndexConfig()
    encode = encode or EncodeConfig()
    shard = options.shard
    parsed = parse_store_uri(uri)
    require_engine(parsed)
    if config.embedding_dtype not in (None, "float32"):
        raise UsageError("a store keeps float32 vectors: leave out --embedding-dtype (or give float32)")
    doc_ids = list(collection.corpus)
    too_long = next((d for d in doc_ids if len(d.encode("utf-8")) > MAX_ID_LENGTH), None)
    if too_long is not None:
        raise UsageError(f"document id {too_long[:40]!r}... is longer than the store's {MAX_ID_LENGTH} bytes")
    start, stop = shard_bounds(len(doc_ids), *shard) if shard else (0, len(doc_ids))
    if stop == start:
        raise UsageError(f"shard {shard[0]}/{shard[1]} of {len(doc_ids)} documents is empty: use fewer")
    head = retriever.head if retriever.head_changes_documents else None  # routed documents only
    meta = store_meta(
        retriever.fingerprint(),
        retriever.model.get_embedding_dimension(),
        len(doc_ids),
        config,
        head.num_experts if head is not None else 0,
        index_metadata(retriever, collection.name, config, encode, options.command),
    )
    texts = [collection.corpus[d].full_text for d in doc_ids[start:stop]]
    retriever.warn_truncated(texts, "document", f"{collection.name} corpus")
    # A Milvus Lite file is the user's --store path; a server's disk is the server's to report.
    full_disk = naming_a_full_disk(parsed.path, "--store") if parsed.is_embedded else contextlib.nullcontext()
    with full_disk:
        store = MilvusStore.create_or_resume(parsed, meta, overwrite=options.overwrite)
        written = skipped = 0
        chunk_size = INDEX_CHUNK_SIZE
        try:
            chunks = range(start, stop, chunk_size)
            for chunk in tqdm(chunks, desc="index --store", unit="chunk", disable=not options.show_progress):
                ids = doc_ids[chunk : min(chunk + chunk_size, stop)]
                present = store.existing_ids(ids)
                todo = [position for position, doc_id in enumerate(ids) if doc_id not in present]
                skipped += len(ids) - len(todo)
                if not todo:
                    continue
                chunk_texts = [texts[chunk - start + position] for position in todo]
                pooled = encode_pooled(
                    retriever,
                    chunk_texts,
                    "document",
                    encode,
                    options=JobOptions(show_progress=False, cache=options.cache),
                )
                experts = gates = None
                if head is not None:
                    chosen, probabilities = route(retriever, pooled)
                    experts, gates = chosen.numpy(), probabilities.numpy()
                store.upsert(
                    [ids[position] for position in todo],
                    apply_head_stages(retriever, pooled, "document"),
                    experts,
                    gates,
                )
                written += len(todo)
            store.finish()
            stored = len(store)
        finally:
            store.close()
    return StoreIndexSummary(uri, start, stop, written, skipped, stored, len(doc_ids))
