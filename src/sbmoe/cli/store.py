"""``sbmoe index --store URI``: encode a corpus into a vector store (see :mod:`sbmoe.retrieval.milvus`)."""

from __future__ import annotations

from typing import Any

from sbmoe.config.jobs import EncodeConfig, IndexConfig, JobOptions

INDEX_URI_HELP = "index directory from `sbmoe index`, or the URI of a store from `sbmoe index --store`"
STORE_HELP = (
    "write into a vector store instead of a FAISS directory: milvus:PATH.db (Milvus Lite, a local "
    "file) or milvus://HOST:PORT[/DATABASE] (a Milvus server), each with ?collection=NAME (default "
    "sbmoe); resumable, and shards (--shard I/N) fill one collection. Needs the 'store' extra"
)


def check_store(uri: str) -> None:
    """Refuse a bad store URI, or a missing ``store`` extra, in one line (before anything loads)."""
    from sbmoe.retrieval.milvus.collection import require_engine
    from sbmoe.retrieval.milvus.uri import parse_store_uri

    require_engine(parse_store_uri(uri))


def index_store(
    retriever: Any,
    collection: Any,
    uri: str,
    config: IndexConfig,
    encode: EncodeConfig,
    options: JobOptions,
) -> None:
    """``sbmoe index --store``: encode the corpus (or ``options.shard`` of it) into the store and report."""
    from sbmoe.retrieval.milvus.indexing import index_into_store

    summary = index_into_store(retriever, collection, uri, config, encode, options)
    shard = options.shard
    part = f"shard {shard[0]}/{shard[1]}, " if shard else ""
    print(
        f"indexed {part}documents {summary.start}:{summary.stop} into {summary.uri}: {summary.written} "
        f"written, {summary.skipped} already there; the store holds {summary.stored} of {summary.corpus}"
    )
