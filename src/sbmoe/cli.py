"""The ``sbmoe`` command line: train, evaluate, index, search, demo.

Only this module parses arguments or prints; each subcommand builds a config and calls one library
function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from sbmoe import __version__
from sbmoe.config import EXPERT_POOLINGS, GATING_VARIANTS, POOLINGS, PRECISIONS, PRESETS, SIMILARITIES
from sbmoe.errors import SbmoeError, UsageError


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        help="BEIR folder, or a collection name looked up in $SBMOE_DATA_DIR, then the cache "
        "(~/.cache/sbmoe/data), then downloaded from the BEIR mirror",
    )


def _add_cache_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        help="pooled-embedding cache (reused by models sharing a backbone; "
        "default for --head-only: $SBMOE_CACHE_DIR/embeddings or ~/.cache/sbmoe/embeddings)",
    )


def _cache(args: argparse.Namespace):
    from sbmoe.cache import EmbeddingCache

    return EmbeddingCache(args.cache_dir) if args.cache_dir else None


def _add_encode_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=64, help="texts per forward pass when encoding")
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="bf16 autocast, fp32, or auto (bf16 where the CPU/GPU has fast bf16)",
    )


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (defaults come from --preset)")
    group.add_argument(
        "--pooling", choices=POOLINGS, help="pooling of the last layer (default: backbone's own)"
    )
    group.add_argument("--similarity", choices=SIMILARITIES, help="cosine, dot, or auto (backbone's own)")
    group.add_argument("--max-query-length", type=int, help="token limit for queries")
    group.add_argument("--max-doc-length", type=int, help="token limit for documents")
    group.add_argument(
        "--num-experts", type=int, help="experts in the MoE block; 0 = plain fine-tuning baseline"
    )
    group.add_argument("--expert-pooling", choices=EXPERT_POOLINGS, help="top1, topk or all")
    group.add_argument("--top-k", type=int, help="experts combined under --expert-pooling topk")
    group.add_argument("--gating", choices=GATING_VARIANTS, help="paper (published code) or learned")
    group.add_argument(
        "--no-noisy-gating",
        dest="noisy_gating",
        action="store_const",
        const=False,
        help="no gate noise while training",
    )
    group.add_argument(
        "--expert-dropout", type=float, help="hide each expert from a text with this probability"
    )
    group.add_argument("--lowercase", action="store_const", const=True, help="lower-case all texts")


def _add_train_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("training (defaults come from --preset)")
    group.add_argument("--epochs", type=int)
    group.add_argument("--max-steps", type=int, help="stop after this many steps")
    group.add_argument("--batch-size", type=int, help="pairs per step (in-batch negatives)")
    group.add_argument("--lr-backbone", type=float)
    group.add_argument("--lr-head", type=float)
    group.add_argument("--weight-decay", type=float)
    group.add_argument("--temperature", type=float, help="scores are divided by it (0.05 = scale 20)")
    group.add_argument("--scheduler", choices=("constant", "linear", "cosine"))
    group.add_argument("--warmup-ratio", type=float)
    group.add_argument("--max-grad-norm", type=float, help="0 disables clipping")
    group.add_argument("--load-balancing-coef", type=float)
    group.add_argument("--router-z-loss-coef", type=float)
    group.add_argument(
        "--no-mask-false-negatives",
        dest="mask_false_negatives",
        action="store_const",
        const=False,
        help="count in-batch documents relevant to a query as its negatives",
    )
    group.add_argument(
        "--symmetric-loss", action="store_const", const=True, help="add a document -> query in-batch loss"
    )
    group.add_argument(
        "--collapse-threshold",
        type=float,
        help="warn when one expert takes more than this share of an epoch's texts",
    )
    group.add_argument("--hard-negatives", type=int, help="mined negatives per query added to each batch")
    group.add_argument("--negatives-source", help="bm25, dense, or a JSON file of query id -> doc ids")
    group.add_argument("--negatives-depth", type=int, help="ranking depth when mining negatives")
    group.add_argument("--seed", type=int)
    group.add_argument("--train-split")
    group.add_argument("--dev-split", help="qrels split for model selection (else a held-out slice)")
    group.add_argument("--dev-fraction", type=float)
    group.add_argument("--dev-max-docs", type=int, help="dev corpus: positives + random docs up to this many")
    group.add_argument("--eval-steps", type=int, help="also evaluate on dev every N steps")
    group.add_argument("--checkpoint-steps", type=int, help="save a resumable checkpoint every N steps")
    group.add_argument("--checkpoint-selection", choices=("best", "last"))
    group.add_argument("--precision", choices=PRECISIONS)
    group.add_argument(
        "--freeze-backbone",
        action="store_const",
        const=True,
        help="train the MoE head only (texts still run through the frozen backbone)",
    )
    group.add_argument(
        "--head-only",
        action="store_const",
        const=True,
        help="train the MoE head only, on pooled embeddings computed once and cached",
    )
    group.add_argument(
        "--length-grouped",
        action="store_const",
        const=True,
        help="batch pairs of similar document length together (less padding)",
    )
    group.add_argument(
        "--grad-cache-chunk-size",
        type=int,
        help="gradient caching: encode a step's texts N at a time (big batches in little memory)",
    )


def _add_index_type_args(parser: argparse.ArgumentParser, default: str | None) -> None:
    parser.add_argument(
        "--index-type",
        choices=("flat", "hnsw", "ivf"),
        default=default,
        help="flat = exact search (default"
        + (")" if default else ": the shards' type)")
        + "; hnsw or ivf = approximate, faster on large corpora",
    )
    parser.add_argument("--nlist", type=int, help="ivf: number of cells (default about 2 sqrt(documents))")
    parser.add_argument("--nprobe", type=int, help="ivf: cells searched per query (default 2 sqrt(nlist))")
    parser.add_argument(
        "--embedding-dtype",
        choices=("float32", "float16"),
        default="float32" if default else None,
        help="how the index stores the embeddings (default "
        + ("float32" if default else "the shards'")
        + "); float16 takes half the memory and disk (scores of unit vectors move by under 5e-4)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbmoe", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"sbmoe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a retriever (with or without an MoE head)")
    train.add_argument("--model", required=True, help="hub name, local directory, or all-MiniLM-L6-v2")
    _add_data_args(train)
    train.add_argument("--output", required=True, help="directory for the model (resumes if interrupted)")
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()),
    )
    _add_model_args(train)
    _add_train_args(train)
    _add_cache_arg(train)
    train.add_argument(
        "--device",
        default="auto",
        help="auto (this process's GPU, else the CPU), cpu, cuda or cuda:N. Under torchrun each "
        "process trains on its slice of every batch: the global batch is --batch-size x processes",
    )

    evaluate = commands.add_parser("evaluate", help="search a split's queries and score the run")
    evaluate.add_argument(
        "--model", required=True, help="saved model directory, hub name or all-MiniLM-L6-v2"
    )
    _add_data_args(evaluate)
    evaluate.add_argument("--split", default="test")
    evaluate.add_argument(
        "--output", required=True, help="directory for metrics.json, per_query.json, run.trec"
    )
    evaluate.add_argument("--top-k", type=int, default=100, help="documents retrieved per query")
    evaluate.add_argument(
        "--expert-pooling",
        nargs="+",
        choices=EXPERT_POOLINGS,
        help="inference rule(s) for an MoE model; several share one encoding pass",
    )
    evaluate.add_argument(
        "--exclude-self", action="store_true", help="drop a document whose id is the query id"
    )
    _add_encode_args(evaluate)
    _add_cache_arg(evaluate)
    evaluate.add_argument(
        "--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N"
    )

    index = commands.add_parser("index", help="encode a corpus (or one shard of it) into a FAISS index")
    index.add_argument("--model", required=True)
    _add_data_args(index)
    index.add_argument("--output", required=True, help="index directory (sharded: holds the shards)")
    _add_index_type_args(index, default="flat")
    index.add_argument(
        "--shard",
        help="i/N: encode only the i-th of N consecutive slices of the corpus into OUTPUT/shard-<i>-of-<N> "
        "(under torchrun each process takes its own shard); search the shards as they are or "
        "merge them with `sbmoe merge-index`",
    )
    index.add_argument("--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N")
    _add_encode_args(index)
    _add_cache_arg(index)

    merge = commands.add_parser("merge-index", help="merge the shards of a sharded index into one index")
    merge.add_argument("--index", required=True, help="sharded index directory from `sbmoe index --shard`")
    merge.add_argument("--output", required=True, help="directory of the merged index")
    _add_index_type_args(merge, default=None)

    search = commands.add_parser("search", help="search an index with queries")
    search.add_argument("--model", required=True, help="the model that built the index")
    search.add_argument("--index", required=True, help="index directory from `sbmoe index`")
    source = search.add_mutually_exclusive_group(required=True)
    source.add_argument("--query", action="append", help="a query text (repeatable)")
    source.add_argument("--queries", help="queries.jsonl (BEIR format)")
    search.add_argument("--top-k", type=int, default=10)
    search.add_argument("--output", help="write the run in TREC format here")
    search.add_argument("--exclude-self", action="store_true")
    _add_encode_args(search)
    search.add_argument(
        "--device", default="auto", help="auto (the GPU when there is one), cpu, cuda, cuda:N"
    )

    demo = commands.add_parser("demo", help="zero-shot vs fine-tuned vs SB-MoE on SciFact, in one table")
    defaults = _demo_defaults()
    demo.add_argument("--data", default=defaults.data)
    demo.add_argument("--model", default=defaults.model)
    demo.add_argument("--output", default=defaults.output)
    demo.add_argument("--epochs", type=int, default=defaults.epochs)
    demo.add_argument("--num-experts", type=int, default=defaults.num_experts)
    demo.add_argument("--gating", choices=GATING_VARIANTS, default=defaults.gating)
    demo.add_argument("--max-doc-length", type=int, default=defaults.max_doc_length)
    demo.add_argument("--precision", choices=PRECISIONS, default=defaults.precision)
    demo.add_argument("--seed", type=int, default=defaults.seed)
    demo.add_argument(
        "--checkpoint-selection", choices=("best", "last"), default=defaults.checkpoint_selection
    )
    demo.add_argument(
        "--no-reference",
        dest="reference",
        action="store_false",
        help="skip the sentence-transformers reference encode",
    )
    experiment = commands.add_parser("experiment", help="run a grid of train -> index -> evaluate cells")
    experiment.add_argument("grid", help="experiment file (YAML), e.g. experiments/scifact-cpu.yaml")
    experiment.add_argument("--output", help="results directory (default: runs/<grid name>)")
    experiment.add_argument("--list", action="store_true", help="print the cells and exit")

    report = commands.add_parser("report", help="tables, significance tests and plots of an experiment")
    report.add_argument("directory", help="an experiment's output directory")
    report.add_argument("--output", help="where to write the report (default: DIRECTORY/report)")
    report.add_argument("--baseline", default="fine-tuned", help="variant every system is tested against")
    report.add_argument("--metric", default="ndcg@10", help="metric of the significance tests")
    report.add_argument("--test", choices=("t-test", "randomization"), default="t-test")
    report.add_argument("--alpha", type=float, default=0.05)
    report.add_argument("--seed", type=int, default=42, help="seed of the randomization test")
    report.add_argument("--no-plots", dest="plots", action="store_false")

    convert = commands.add_parser(
        "convert-multidomain", help="convert a Multi-Domain Benchmark collection to a BEIR folder"
    )
    convert.add_argument(
        "source", help="extracted release folder (holding collection.jsonl, train/, val/, test/)"
    )
    convert.add_argument(
        "--output", required=True, help="BEIR folder to write, e.g. $SBMOE_DATA_DIR/political-science"
    )
    return parser


def _command_experiment(args: argparse.Namespace) -> int:
    from sbmoe.experiments import expand, load_grid, run_experiment

    grid = load_grid(args.grid)
    if args.list:
        for cell in expand(grid):
            print(cell.cell_id)
        return 0
    output = args.output or f"runs/{grid.name}"
    summary = run_experiment(grid, output, show_progress=not args.quiet, command=args.command_line)
    print(
        f"{len(summary.finished)} cells run, {len(summary.skipped)} already finished, "
        f"{len(summary.failed)} failed ({summary.seconds:.0f} s); results in {output}"
    )
    for cell_id, error in summary.failed.items():
        print(f"  failed: {cell_id}: {error} (see {output}/cells/{cell_id}/error.json)")
    return 1 if summary.failed else 0


def _command_report(args: argparse.Namespace) -> int:
    from sbmoe.report import build_report, write_report

    report = build_report(
        args.directory,
        baseline=args.baseline,
        metric=args.metric,
        test=args.test,
        alpha=args.alpha,
        seed=args.seed,
    )
    target = Path(args.output or Path(args.directory) / "report")
    written = write_report(report, target, plots=args.plots)
    print(report.markdown())
    print("written: " + ", ".join(str(path) for path in written))
    return 0


def _command_convert_multidomain(args: argparse.Namespace) -> int:
    from sbmoe.multidomain import convert_multidomain

    print(f"wrote {convert_multidomain(args.source, args.output)}")
    return 0


def _demo_defaults():
    from sbmoe.demo import DemoConfig

    return DemoConfig()


def _fields(args: argparse.Namespace, cls: type) -> dict:
    values = vars(args)
    return {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}


def _command_train(args: argparse.Namespace) -> int:
    from sbmoe.config import ModelConfig, TrainConfig, build_configs
    from sbmoe.data import load_collection, resolve_data
    from sbmoe.distributed import distributed_session
    from sbmoe.training import train

    model_config, train_config = build_configs(
        args.preset, {**_fields(args, ModelConfig), "backbone": args.model}, _fields(args, TrainConfig)
    )
    collection = load_collection(resolve_data(args.data))
    # Under torchrun: joins the process group; rank 0 alone writes, logs and prints.
    with distributed_session(args.device) as context:
        if not context.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        result = train(
            model_config,
            train_config,
            collection,
            args.output,
            show_progress=not args.quiet,
            command=args.command_line,
            cache=_cache(args),
            context=context,
        )
    if context.is_main:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def _command_evaluate(args: argparse.Namespace) -> int:
    from sbmoe.data import load_collection, resolve_data
    from sbmoe.modeling import Retriever
    from sbmoe.pipeline import EvaluateConfig, evaluate_model

    config = EvaluateConfig(
        split=args.split,
        top_k=args.top_k,
        batch_size=args.batch_size,
        precision=args.precision,
        exclude_self=args.exclude_self,
        expert_poolings=args.expert_pooling or [],
    )
    collection = load_collection(resolve_data(args.data), splits=[args.split])
    retriever = Retriever.load(args.model, device=args.device)
    outputs = evaluate_model(
        retriever,
        collection,
        args.output,
        config,
        show_progress=not args.quiet,
        command=args.command_line,
        cache=_cache(args),
    )
    for output in outputs:
        scores = "  ".join(f"{name} {value:.4f}" for name, value in output.result.metrics.items())
        print(f"{output.name}: {scores}  ({output.output_dir / 'metrics.json'})")
    return 0


def _command_index(args: argparse.Namespace) -> int:
    from sbmoe.data import load_collection, resolve_data
    from sbmoe.distributed import distributed_session, parse_shard
    from sbmoe.modeling import Retriever
    from sbmoe.pipeline import index_corpus
    from sbmoe.shards import shard_directory

    shard = parse_shard(args.shard) if args.shard else None
    collection = load_collection(resolve_data(args.data), splits=[])
    with distributed_session(args.device) as context:
        if context.is_distributed:
            if shard is not None:
                raise UsageError("under torchrun each process indexes its own shard: leave out --shard")
            shard = (context.rank, context.world_size)
        retriever = Retriever.load(args.model, device=context.device)
        index = index_corpus(
            retriever,
            collection,
            args.output,
            args.batch_size,
            args.precision,
            args.index_type,
            show_progress=not args.quiet and context.is_main,
            command=args.command_line,
            cache=_cache(args),
            shard=shard,
            nlist=args.nlist,
            nprobe=args.nprobe,
            dtype=args.embedding_dtype,
        )
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


def _command_merge_index(args: argparse.Namespace) -> int:
    from sbmoe.pipeline import merge_index

    merged = merge_index(
        args.index,
        args.output,
        args.index_type,
        args.nlist,
        args.nprobe,
        command=args.command_line,
        dtype=args.embedding_dtype,
    )
    shards = merged.metadata["merged_from_shards"]
    print(f"merged {shards} shards ({len(merged)} documents) into {args.output}")
    return 0


def _command_search(args: argparse.Namespace) -> int:
    from sbmoe.data import read_queries
    from sbmoe.evaluation import write_trec_run
    from sbmoe.modeling import Retriever
    from sbmoe.pipeline import describe_run, search_index

    queries = (
        read_queries(args.queries) if args.queries else {f"q{i}": q for i, q in enumerate(args.query, 1)}
    )
    retriever = Retriever.load(args.model, device=args.device)
    run = search_index(
        retriever, args.index, queries, args.top_k, args.exclude_self, args.batch_size, args.precision
    )
    if args.output:
        write_trec_run(run, args.output)
        print(f"wrote {args.output}")
    else:
        for row in describe_run(run, args.top_k):
            print(f"{row['query_id']}\t{row['rank']}\t{row['doc_id']}\t{row['score']:.4f}")
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from sbmoe.demo import DemoConfig, run_demo

    config = DemoConfig(**_fields(args, DemoConfig))
    report = run_demo(config, show_progress=not args.quiet, command=args.command_line)
    print(report.markdown())
    print(f"(written to {Path(config.output) / 'demo.md'} and demo.json)")
    return 0


COMMANDS = {
    "train": _command_train,
    "evaluate": _command_evaluate,
    "index": _command_index,
    "merge-index": _command_merge_index,
    "search": _command_search,
    "demo": _command_demo,
    "experiment": _command_experiment,
    "report": _command_report,
    "convert-multidomain": _command_convert_multidomain,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sbmoe`` command."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = ["sbmoe", *argv]
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    import transformers

    # Our own bars show the work; per-file "Loading weights" bars from transformers are noise here.
    transformers.utils.logging.disable_progress_bar()
    logging.getLogger("sentence_transformers").setLevel(logging.WARNING)
    try:
        return COMMANDS[args.command](args)
    except SbmoeError as error:
        print(f"sbmoe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
