"""The index jobs: encode a corpus (or a shard of it) in resumable chunks into a FAISS index, and merge
index shards.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sbmoe.config.jobs import EncodeConfig, IndexConfig, JobOptions
from sbmoe.config.provenance import provenance
from sbmoe.core.artifacts import INDEX, SHARDED_INDEX, index_settings, writing_output
from sbmoe.core.distributed import shard_bounds
from sbmoe.core.errors import UsageError
from sbmoe.core.runtime import resolve_inference
from sbmoe.data.beir import BeirCollection
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import CACHE_CHUNK_SIZE, encode_texts
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.files import shard_directory
from sbmoe.retrieval.faiss.index import DenseIndex
from sbmoe.retrieval.sharded.index import ShardedIndex

# Documents encoded (and kept) at a time while indexing, so that an interrupted index resumes.
INDEX_CHUNK_SIZE = CACHE_CHUNK_SIZE


def build_index(
    retriever: Retriever,
    documents: Mapping[str, str],
    config: IndexConfig | None = None,
    encode: EncodeConfig | None = None,
    *,
    show_progress: bool = False,
    cache: EmbeddingCache | None = None,
) -> DenseIndex:
    """Encode ``documents`` (doc id -> text) into a FAISS inner-product index tagged with the model.

    ``config`` chooses the index type (none given: ``flat``, exact), IVF cells and the embeddings'
    storage dtype (none given: ``float32``); see :class:`~sbmoe.retrieval.faiss.index.DenseIndex`.
    """
    config = config or IndexConfig()
    embeddings = encode_texts(
        retriever,
        list(documents.values()),
        "document",
        encode,
        options=JobOptions(show_progress=show_progress, cache=cache),
        chunk_size=INDEX_CHUNK_SIZE,
    )
    return DenseIndex(embeddings, list(documents), retriever.fingerprint(), config)


def index_corpus(
    retriever: Retriever,
    collection: BeirCollection,
    output_dir: str | Path,
    config: IndexConfig | None = None,
    encode: EncodeConfig | None = None,
    options: JobOptions | None = None,
) -> DenseIndex:
    """Encode the collection's corpus and save the FAISS index (with the model's fingerprint).

    The index's metadata records the collection, the model, index and encode configs, and
    :func:`~sbmoe.config.provenance.provenance`.

    Args:
        options: Progress bars, the command recorded, the embedding cache, ``overwrite`` (replace
            an earlier index in ``output_dir`` made from another model, collection or index config;
            anything but an index there is refused anyway, see
            :func:`~sbmoe.core.artifacts.writing_output`) and ``shard``: ``(i, N)`` encodes only the
            ``i``-th of ``N`` consecutive slices of the corpus and saves it as that shard of the
            sharded index ``output_dir`` (see :class:`~sbmoe.retrieval.sharded.index.ShardedIndex`);
            shards can be built by different processes or machines. ``None`` indexes the whole
            corpus into ``output_dir``.

    Returns:
        The index built (the shard's, when sharded).
    """
    options = options or JobOptions()
    config = config or IndexConfig()
    encode = encode or EncodeConfig()
    shard = options.shard
    doc_ids = list(collection.corpus)
    start, stop = shard_bounds(len(doc_ids), *shard) if shard else (0, len(doc_ids))
    if stop == start:
        raise UsageError(f"shard {shard[0]}/{shard[1]} of {len(doc_ids)} documents is empty: use fewer")
    documents = {d: collection.corpus[d].full_text for d in doc_ids[start:stop]}
    target = shard_directory(output_dir, *shard) if shard else Path(output_dir)
    settings = index_settings(retriever.fingerprint(), collection.name, config)
    # Without a cache of the caller's, encoded chunks wait beside the output until the index is saved:
    # a killed run, run again, encodes only what is missing.
    chunks = target.parent / f".{target.name}.chunks"
    within = SHARDED_INDEX if shard else None
    with writing_output(target, INDEX, settings, overwrite=options.overwrite, within=within):
        retriever.warn_truncated(list(documents.values()), "document", f"{collection.name} corpus")
        index = build_index(
            retriever,
            documents,
            config,
            encode,
            show_progress=options.show_progress,
            cache=options.cache or EmbeddingCache(chunks),
        )
        index.metadata.update(index_metadata(retriever, collection.name, config, encode, options.command))
        if shard:
            index.save_shard(output_dir, shard[0], shard[1], start, len(collection.corpus))
        else:
            index.save(output_dir)
        shutil.rmtree(chunks, ignore_errors=True)
    return index


def merge_index(
    index_dir: str | Path,
    output_dir: str | Path,
    config: IndexConfig | None = None,
    options: JobOptions | None = None,
) -> DenseIndex:
    """Merge the shards in ``index_dir`` into one index saved in ``output_dir``.

    The merged index ranks exactly like a single-process index of the same type (for ``flat``,
    the same index). ``config``'s index type and dtype may differ from the shards' (e.g. exact
    shards, IVF merged; float32 shards, float16 merged) and default to theirs. The metadata keeps
    the shards' and adds the merge's :func:`~sbmoe.config.provenance.provenance` under ``merge``.

    Args:
        options: The command recorded, and ``overwrite``: replace an earlier index in ``output_dir``
            made from another model, collection or shards' index config (anything but an index there
            is refused anyway; see :func:`~sbmoe.core.artifacts.writing_output`).
    """
    options = options or JobOptions()
    config = config or IndexConfig()
    sharded = ShardedIndex.load(index_dir)
    # The merged index is what the shards are: their model, collection and index config.
    shards_config = sharded.metadata.get("index_config")
    settings = index_settings(sharded.fingerprint, sharded.metadata.get("collection"), shards_config)
    with writing_output(output_dir, INDEX, settings, overwrite=options.overwrite):
        merged = sharded.merge(config)
        merged.metadata["merge"] = {"index_config": config.to_dict(), **provenance(options.command)}
        merged.save(output_dir)
    return merged


def index_metadata(
    retriever: Retriever,
    collection: str,
    config: IndexConfig,
    encode: EncodeConfig,
    command: Sequence[str] | None,
) -> dict[str, Any]:
    """What an index (FAISS or a store) records of how it was made, beside the model's fingerprint."""
    return {
        "collection": collection,
        # What the documents are: a query-side model of the same backbone searches them too.
        "document_fingerprint": retriever.document_fingerprint(),
        "model_config": retriever.config.to_dict(),
        "index_config": config.to_dict(),
        "encode_config": encode.to_dict(),
        "encoding": encoding_used(retriever, encode),
        **provenance(command),
    }


def encoding_used(retriever: Retriever, encode: EncodeConfig) -> dict[str, str]:
    """The backend and precision that ``encode`` resolves to for ``retriever`` here, and why."""
    plan = resolve_inference(encode.backend, encode.precision, retriever.device)
    return {"backend": plan.backend, "precision": plan.precision, "reason": plan.reason}
