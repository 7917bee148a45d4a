"""``sbmoe index --store URI``: encode a corpus into a vector store (see :mod:`sbmoe.retrieval.store`)."""

from __future__ import annotations

import argparse

from sbmoe.cli import common
from sbmoe.config.jobs import EncodeConfig, IndexConfig
from sbmoe.core.errors import UsageError

INDEX_URI_HELP = "index directory from `sbmoe index`, or the URI of a store from `sbmoe index --store`"
STORE_HELP = (
    "write into a vector store instead of a FAISS directory: milvus:PATH.db (Milvus Lite, a local "
    "file) or milvus://HOST:PORT[/DATABASE] (a Milvus server), each with ?collection=NAME (default "
    "sbmoe); resumable, and shards (--shard I/N) fill one collection. Needs the 'store' extra"
)


def command_index_store(args: argparse.Namespace) -> int:
    """Run ``sbmoe index --store``: encode the corpus (or ``--shard``) into the store and report."""
    from sbmoe.core.distributed import distributed_session, parse_shard
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.retrieval.milvus_collection import require_engine
    from sbmoe.retrieval.store_indexing import index_into_store
    from sbmoe.retrieval.store_uri import parse_store_uri

    config = common.config_from(args, IndexConfig)
    encode = common.config_from(args, EncodeConfig)
    require_engine(parse_store_uri(args.store))  # before the model and corpus load
    shard = parse_shard(args.shard) if args.shard else None
    collection = load_collection(resolve_data(args.data), splits=[])
    with distributed_session(encode.device) as context:
        if context.is_distributed:
            if shard is not None:
                raise UsageError("under torchrun each process indexes its own shard: leave out --shard")
            shard = (context.rank, context.world_size)
        retriever = common.load_retriever(args, context.device)
        options = common.job_options(args, show_progress=context.is_main)
        summary = index_into_store(
            retriever, collection, args.store, config, encode, options=options, shard=shard
        )
        part = f"shard {shard[0]}/{shard[1]}, " if shard else ""
        print(
            f"indexed {part}documents {summary.start}:{summary.stop} into {summary.uri}: {summary.written} "
            f"written, {summary.skipped} already there; the store holds {summary.stored} of "
            f"{summary.corpus}"
        )
        context.barrier()
    return 0
