"""``sbmoe index`` (a corpus, or one shard of it, into a FAISS index) and ``sbmoe merge-index``."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from sbmoe.cli import common
from sbmoe.cli.flags import add_config_flags
from sbmoe.cli.store import STORE_HELP, check_store, index_store
from sbmoe.config.jobs import EncodeConfig, IndexConfig
from sbmoe.core.errors import UsageError


def register(commands: Any) -> None:
    index = common.add_verb(
        commands, "index", "encode a corpus (or one shard of it) into a FAISS index or a vector store"
    )
    common.add_model_flag(index, "saved model directory, hub name or all-MiniLM-L6-v2")
    common.add_data_flag(index)
    target = index.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="index directory (sharded: the folder of the shards)")
    target.add_argument("--store", metavar="URI", help=STORE_HELP)
    common.add_overwrite_flag(index, "index")
    add_config_flags(index.add_argument_group("index"), IndexConfig)
    index.add_argument(
        "--shard",
        metavar="I/N",
        help="encode only the I-th (from 0) of N consecutive slices of the corpus into "
        "OUTPUT/shard-<I>-of-<N> (under torchrun each process takes its own); search the shards as "
        "they are or merge them with `sbmoe merge-index` (default: the whole corpus)",
    )
    common.add_encode_flags(index)
    common.add_cache_flag(index)
    index.set_defaults(run=run_index)

    merge = common.add_verb(commands, "merge-index", "merge the shards of a sharded index into one index")
    merge.add_argument("--index", required=True, help="sharded index directory from `sbmoe index --shard`")
    merge.add_argument("--output", required=True, help="directory of the merged index")
    common.add_overwrite_flag(merge, "index")
    add_config_flags(merge.add_argument_group("index"), IndexConfig)
    merge.set_defaults(run=run_merge)


def run_index(args: argparse.Namespace) -> int:
    from sbmoe.core.distributed import distributed_session, parse_shard
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.retrieval.faiss.files import shard_directory
    from sbmoe.retrieval.indexing import index_corpus

    config = common.config_from(args, IndexConfig)
    encode = common.config_from(args, EncodeConfig)
    if args.store:
        check_store(args.store)  # before the model and corpus load
    shard = parse_shard(args.shard) if args.shard else None
    collection = load_collection(resolve_data(args.data), splits=[])
    with distributed_session(encode.device) as context:
        if context.is_distributed:
            if shard is not None:
                raise UsageError("under torchrun each process indexes its own shard: leave out --shard")
            shard = (context.rank, context.world_size)
        retriever = common.load_retriever(args, context.device)
        options = dataclasses.replace(common.job_options(args, show_progress=context.is_main), shard=shard)
        if args.store:
            index_store(retriever, collection, args.store, config, encode, options)
            context.barrier()
            return 0
        index = index_corpus(retriever, collection, args.output, config, encode, options)
        if shard is None:
            print(f"indexed {len(index.doc_ids)} documents into {args.output}")
            return 0
        print(
            f"indexed shard {shard[0]}/{shard[1]} ({len(index.doc_ids)} documents) into "
            f"{shard_directory(args.output, *shard)}"
        )
        context.barrier()
    if context.is_main:
        when = "now" if context.is_distributed else f"once all {shard[1]} shards are written"
        print(
            f"search the shards as they are {when} (`sbmoe search --index {args.output} ...`), or merge "
            f"them: `sbmoe merge-index --index {args.output} --output DIR`"
        )
    return 0


def run_merge(args: argparse.Namespace) -> int:
    from sbmoe.retrieval.indexing import merge_index

    merged = merge_index(
        args.index, args.output, common.config_from(args, IndexConfig), common.job_options(args)
    )
    shards = merged.metadata["merged_from_shards"]
    print(f"merged {shards} shards ({len(merged)} documents) into {args.output}")
    return 0
