"""``sbmoe search`` (queries over an index) and ``sbmoe serve`` (the same over HTTP)."""

from __future__ import annotations

import argparse
import contextlib
from typing import TYPE_CHECKING, Any

from sbmoe.cli.common import add_encode_flags, add_model_flag, add_verb, config_from, load_retriever
from sbmoe.cli.flags import add_config_flags, given_values
from sbmoe.cli.store import INDEX_URI_HELP
from sbmoe.config.jobs import EncodeConfig, SearchConfig, ServeConfig
from sbmoe.core.errors import UsageError

if TYPE_CHECKING:
    from sbmoe.serving.service import SearchService


def register(commands: Any) -> None:
    search = add_verb(commands, "search", "search an index with queries")
    add_model_flag(search, "the model that built the index")
    search.add_argument("--index", required=True, help=INDEX_URI_HELP)
    source = search.add_mutually_exclusive_group(required=True)
    source.add_argument("--query", action="append", help="a query text (repeatable)")
    source.add_argument("--queries", help="queries.jsonl (BEIR format)")
    search.add_argument("--output", help="write the run in TREC format here (default: print the hits)")
    search.add_argument(
        "--verify",
        action="store_true",
        help="check the whole index against its checksum before searching (default: its size and a "
        "sample of it)",
    )
    # Exact search over texts runs several rules; an index holds one (`sbmoe evaluate` searches texts).
    add_config_flags(search.add_argument_group("search"), SearchConfig, skip={"expert_poolings"})
    add_encode_flags(search)
    search.set_defaults(run=run_search)

    serve = add_verb(commands, "serve", "answer searches over HTTP, with the model and index loaded once")
    add_model_flag(serve, "the model that built the index")
    serve.add_argument("--index", required=True, help=INDEX_URI_HELP)
    serve.add_argument(
        "--data",
        help="the collection the index was built from (BEIR folder or name), so that hits can carry "
        "their titles and texts (default: ids and scores only)",
    )
    serve.add_argument(
        "--verify", action="store_true", help="check the whole index against its checksum before serving"
    )
    add_config_flags(serve.add_argument_group("server"), ServeConfig)
    add_config_flags(
        serve.add_argument_group("search (a request may ask otherwise)"), SearchConfig, only={"top_k"}
    )
    add_encode_flags(serve)
    serve.set_defaults(run=run_serve)


def run_search(args: argparse.Namespace) -> int:
    from sbmoe.core.artifacts import FILE, writing_output
    from sbmoe.data.beir import read_queries
    from sbmoe.evaluation.metrics import write_trec_run
    from sbmoe.retrieval import open_index
    from sbmoe.retrieval.search import describe_run, search

    config = config_from(args, SearchConfig)
    encode = config_from(args, EncodeConfig)
    if args.query and not all(query.strip() for query in args.query):
        raise UsageError("--query is empty: give the text to search for")
    queries = (
        read_queries(args.queries) if args.queries else {f"q{i}": q for i, q in enumerate(args.query, 1)}
    )
    # The run file's gate opens before the model loads: a directory there is refused at once.
    with writing_output(args.output, FILE) if args.output else contextlib.nullcontext():
        retriever = load_retriever(args, encode.device)
        index = open_index(args.index, retriever.index_fingerprints(), verify=args.verify)
        run = search(retriever, index, queries, config, encode)
        if args.output:
            write_trec_run(run, args.output)
    if args.output:
        print(f"wrote {args.output}")
    else:
        for row in describe_run(run, config.top_k):
            print(f"{row['query_id']}\t{row['rank']}\t{row['doc_id']}\t{row['score']:.4f}")
    return 0


def run_serve(args: argparse.Namespace) -> int:
    from sbmoe.serving.http import serve

    config = config_from(args, ServeConfig)
    search = SearchConfig(**given_values(args, SearchConfig))
    encode = config_from(args, EncodeConfig)

    def load_service() -> SearchService:
        from sbmoe.data.beir import load_collection, resolve_data
        from sbmoe.retrieval import open_index
        from sbmoe.serving.service import SearchService

        retriever = load_retriever(args, encode.device)
        index = open_index(args.index, retriever.index_fingerprints(), verify=args.verify)
        collection = load_collection(resolve_data(args.data), splits=[]) if args.data else None
        return SearchService(retriever, index, search, encode, collection=collection, config=config)

    serve(
        load_service,
        config,
        log_level="warning" if args.quiet else "info",
        announce=lambda url: print(f"listening on {url}", flush=True),
    )
    return 0
