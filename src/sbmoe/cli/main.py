"""The ``sbmoe`` command line: train, evaluate, index, search, demo.

Only this module parses arguments or prints; each subcommand builds a config and calls one library
function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sbmoe import __version__
from sbmoe.cli.flags import add_config_flags, given_values, preset_default_describer
from sbmoe.cli.store import INDEX_URI_HELP, STORE_HELP
from sbmoe.config.jobs import (
    EncodeConfig,
    EvaluateConfig,
    IndexConfig,
    ReportConfig,
    SearchConfig,
    ServeConfig,
)
from sbmoe.config.model import ModelConfig
from sbmoe.config.presets import PRESETS
from sbmoe.config.train import TrainConfig
from sbmoe.core.artifacts import EVALUATION, INDEX, SHARDED_INDEX, TRAINING_RUN, check_output, output_lock
from sbmoe.core.errors import SbmoeError, UsageError

DESCRIPTION = "Dense retrieval with a single-block Mixture-of-Experts head: train, index, search, evaluate."


def _add_model_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--model", required=True, help=help_text)


def _add_data_flag(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--data",
        required=required,
        help="BEIR folder, or a collection name looked up in $SBMOE_DATA_DIR, then the cache "
        "(~/.cache/sbmoe/data), then downloaded from the BEIR mirror, or irds:ID (an ir_datasets "
        "id such as irds:beir/scifact/test)",
    )


def _add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        help="pooled-embedding cache, reused by models sharing a backbone (default: none; "
        "--head-only uses $SBMOE_CACHE_DIR/embeddings or ~/.cache/sbmoe/embeddings)",
    )


def _cache(args: argparse.Namespace):
    from sbmoe.inference.cache import EmbeddingCache

    return EmbeddingCache(args.cache_dir) if args.cache_dir else None


def _add_model_and_train_flags(parser: argparse.ArgumentParser, preset_note: str) -> None:
    model = parser.add_argument_group(f"model {preset_note}")
    add_config_flags(
        model, ModelConfig, skip={"backbone"}, describe_default=preset_default_describer(PRESETS, "model")
    )
    train = parser.add_argument_group(f"training {preset_note}")
    add_config_flags(train, TrainConfig, describe_default=preset_default_describer(PRESETS, "train"))


def _add_length_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("token limits (none given: the model's own)")
    add_config_flags(
        group,
        ModelConfig,
        only=("max_query_length", "max_doc_length"),
        describe_default=lambda _: "default: the model's",
    )


def _add_encode_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser.add_argument_group("encoding"), EncodeConfig)


def _add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an earlier {what} at --output made with other settings (without it that is "
        "refused; anything else at --output is always refused)",
    )


def _add_evaluation_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--evaluation",
        action="append",
        default=[],
        metavar="DIR",
        help="add the test metrics of an `sbmoe evaluate` output of this model to the card (repeatable)",
    )


def _add_verb(commands, name: str, help_text: str) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    # -q is accepted after the verb too (SUPPRESS keeps a -q given before the verb).
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The ``sbmoe`` parser: flags are generated from the config dataclasses (see ``sbmoe.config``)."""
    parser = argparse.ArgumentParser(prog="sbmoe", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sbmoe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = _add_verb(
        commands, "train", "fine-tune a retriever (with or without an MoE head); resumes if interrupted"
    )
    _add_model_flag(train, ModelConfig.__dataclass_fields__["backbone"].metadata["help"])
    _add_data_flag(train, required=False)
    train.add_argument(
        "--output", required=True, help="directory for the model and training/ (resumes if interrupted)"
    )
    _add_overwrite_flag(train, "training run")
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()) + " (default: default)",
    )
    _add_model_and_train_flags(train, "(defaults come from --preset)")
    add_config_flags(
        train,
        EncodeConfig,
        only={"device"},
        describe_default=lambda _: (
            "default: auto; under torchrun each process trains its slice of every "
            "batch, so the global batch is --batch-size x processes"
        ),
    )
    _add_cache_flag(train)

    evaluate = _add_verb(commands, "evaluate", "search a split's queries over the corpus and score the run")
    _add_model_flag(evaluate, "saved model directory, hub name or all-MiniLM-L6-v2")
    _add_data_flag(evaluate)
    evaluate.add_argument(
        "--output", required=True, help="directory for metrics.json, per_query.json, run.trec"
    )
    _add_overwrite_flag(evaluate, "evaluation")
    add_config_flags(evaluate.add_argument_group("evaluation"), EvaluateConfig)
    _add_length_overrides(evaluate)
    _add_encode_flags(evaluate)
    _add_cache_flag(evaluate)

    index = _add_verb(
        commands, "index", "encode a corpus (or one shard of it) into a FAISS index or a vector store"
    )
    _add_model_flag(index, "saved model directory, hub name or all-MiniLM-L6-v2")
    _add_data_flag(index)
    target = index.add_mutually_exclusive_group(required=True)
    target.add_argument("--output", help="index directory (sharded: the folder of the shards)")
    target.add_argument("--store", metavar="URI", help=STORE_HELP)
    _add_overwrite_flag(index, "index")
    add_config_flags(index.add_argument_group("index"), IndexConfig)
    index.add_argument(
        "--shard",
        metavar="I/N",
        help="encode only the I-th of N consecutive slices of the corpus into OUTPUT/shard-<I>-of-<N> "
        "(under torchrun each process takes its own); search the shards as they are or merge them "
        "with `sbmoe merge-index` (default: the whole corpus)",
    )
    _add_encode_flags(index)
    _add_cache_flag(index)

    merge = _add_verb(commands, "merge-index", "merge the shards of a sharded index into one index")
    merge.add_argument("--index", required=True, help="sharded index directory from `sbmoe index --shard`")
    merge.add_argument("--output", required=True, help="directory of the merged index")
    _add_overwrite_flag(merge, "index")
    add_config_flags(merge.add_argument_group("index"), IndexConfig)

    search = _add_verb(commands, "search", "search an index with queries")
    _add_model_flag(search, "the model that built the index")
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
    add_config_flags(search.add_argument_group("search"), SearchConfig)
    _add_encode_flags(search)

    serve = _add_verb(commands, "serve", "answer searches over HTTP, with the model and index loaded once")
    _add_model_flag(serve, "the model that built the index")
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
    _add_encode_flags(serve)

    demo = _add_verb(commands, "demo", "zero-shot vs fine-tuned vs SB-MoE on SciFact, in one table")
    demo.add_argument("--model", help="backbone (default: the demo's, all-MiniLM-L6-v2)")
    _add_data_flag(demo, required=False)
    demo.add_argument("--output", default="runs/demo", help="results directory (default: runs/demo)")
    demo.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also encode with sentence-transformers' own encode, the row zero-shot must match (default: on)",
    )
    _add_model_and_train_flags(demo, "(none given: the demo grid's own settings)")

    experiment = _add_verb(commands, "experiment", "run a grid of train -> evaluate cells (resumable)")
    experiment.add_argument("grid", help="experiment file (YAML), e.g. experiments/scifact-cpu.yaml")
    experiment.add_argument("--output", help="results directory (default: runs/<grid name>)")
    experiment.add_argument("--list", action="store_true", help="print the cells and exit")
    experiment.add_argument(
        "--shard",
        default="0/1",
        metavar="I/N",
        help="run only cells I, I+N, I+2N, ... (N processes share one --output; default: %(default)s)",
    )

    report = _add_verb(commands, "report", "tables, significance tests and plots of an experiment")
    report.add_argument("directory", help="an experiment's output directory")
    report.add_argument("--output", help="where to write the report (default: DIRECTORY/report)")
    add_config_flags(report, ReportConfig)

    push = _add_verb(commands, "push", "upload a saved model with its model card to the Hugging Face Hub")
    push.add_argument("directory", help="saved model folder (from `sbmoe train`); training/ is not uploaded")
    push.add_argument("repo_id", help="hub repository, e.g. USER/scifact-sbmoe (created when missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument(
        "--token", help="token with write access (default: $HF_TOKEN, else the one of `hf auth login`)"
    )
    _add_evaluation_flag(push)

    card = _add_verb(commands, "model-card", "(re)write a saved model's README.md model card")
    card.add_argument("directory", help="saved model folder (from `sbmoe train`)")
    _add_evaluation_flag(card)

    convert = _add_verb(
        commands, "convert-multidomain", "convert a Multi-Domain Benchmark collection to a BEIR folder"
    )
    convert.add_argument(
        "source", help="extracted release folder (holding collection.jsonl, train/, val/, test/)"
    )
    convert.add_argument(
        "--output", required=True, help="BEIR folder to write, e.g. $SBMOE_DATA_DIR/political-science"
    )
    return parser


def _parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with 0 <= I < N."""
    match = re.fullmatch(r"(\d+)/(\d+)", text.strip())
    if not match or not int(match[1]) < int(match[2]):
        raise UsageError(f"--shard must be I/N with 0 <= I < N (e.g. 0/4), got {text!r}")
    return int(match[1]), int(match[2])


def _command_experiment(args: argparse.Namespace) -> int:
    from sbmoe.study.experiments import expand, load_grid, run_experiment

    grid = load_grid(args.grid)
    shard = _parse_shard(args.shard)
    if args.list:
        for cell in expand(grid)[shard[0] :: shard[1]]:
            print(cell.cell_id)
        return 0
    output = args.output or f"runs/{grid.name}"
    summary = run_experiment(
        grid, output, show_progress=not args.quiet, command=args.command_line, shard=shard
    )
    print(
        f"{len(summary.finished)} cells run, {len(summary.skipped)} already finished, "
        f"{len(summary.failed)} failed ({summary.seconds:.0f} s); results in {output}"
    )
    for cell_id, error in summary.failed.items():
        print(f"  failed: {cell_id}: {error} (see {output}/cells/{cell_id}/error.json)")
    return 1 if summary.failed else 0


def _command_report(args: argparse.Namespace) -> int:
    from sbmoe.study.report import build_report, write_report

    config = ReportConfig(**given_values(args, ReportConfig))
    config.validate()
    report = build_report(
        args.directory,
        baseline=config.baseline,
        metric=config.metric,
        test=config.test,
        alpha=config.alpha,
        seed=config.randomization_seed,
    )
    target = Path(args.output or Path(args.directory) / "report")
    written = write_report(report, target, plots=config.plots)
    print(report.to_report().to_markdown())
    print("written: " + ", ".join(str(path) for path in written))
    return 0


def _command_convert_multidomain(args: argparse.Namespace) -> int:
    from sbmoe.data.multidomain import convert_multidomain

    print(f"wrote {convert_multidomain(args.source, args.output)}")
    return 0


def _encode_config(args: argparse.Namespace) -> EncodeConfig:
    config = EncodeConfig(**given_values(args, EncodeConfig))
    config.validate()
    return config


def _load_retriever(args: argparse.Namespace, device: Any):
    """The model of ``--model``, with the token limits given on the command line (evaluate only)."""
    from sbmoe.model.retriever import Retriever

    retriever = Retriever.load(args.model, device=device)
    limits = given_values(args, ModelConfig, ("max_query_length", "max_doc_length"))
    if limits:
        retriever.config = dataclasses.replace(retriever.config, **limits)
        retriever.config.validate()
    return retriever


def _command_train(args: argparse.Namespace) -> int:
    from sbmoe.config.presets import build_configs
    from sbmoe.core.distributed import distributed_session
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.train.trainer import train

    model_config, train_config = build_configs(
        args.preset,
        {**given_values(args, ModelConfig), "backbone": args.model},
        given_values(args, TrainConfig),
    )
    check_output(args.output, TRAINING_RUN)
    # No --data: train_config.train_file names a training file, which train() reads.
    collection = load_collection(resolve_data(args.data)) if args.data else None
    # Under torchrun: joins the process group; rank 0 alone writes, logs and prints.
    with distributed_session(args.device or "auto") as context:
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
            overwrite=args.overwrite,
        )
    if context.is_main:
        print(json.dumps(result.to_dict(), indent=2))
    return 0


def _command_evaluate(args: argparse.Namespace) -> int:
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.evaluation.evaluate import evaluate_model
    from sbmoe.evaluation.query_groups import splits_to_load
    from sbmoe.evaluation.tables import metric_label

    config = EvaluateConfig(**given_values(args, EvaluateConfig))
    config.validate()
    encode = _encode_config(args)
    check_output(args.output, EVALUATION)
    root = resolve_data(args.data)
    # The train split too, when there is one: it tells seen from unseen queries (evaluation.query_groups).
    collection = load_collection(root, splits=splits_to_load(root, config.split))
    retriever = _load_retriever(args, encode.device)
    outputs = evaluate_model(
        retriever,
        collection,
        args.output,
        config,
        encode,
        show_progress=not args.quiet,
        command=args.command_line,
        cache=_cache(args),
        overwrite=args.overwrite,
    )
    for output in outputs:
        scores = "  ".join(
            f"{metric_label(name)} {value:.4f}" for name, value in output.result.metrics.items()
        )
        print(f"{output.name}: {scores}  ({output.output_dir / 'metrics.json'})")
        for group, summary in (output.query_groups or {}).items():
            means = "  ".join(f"{metric_label(m)} {v:.4f}" for m, v in summary.items() if m != "num_queries")
            print(f"  {group} queries (n={summary['num_queries']}): {means or '-'}")
    return 0


def _command_index(args: argparse.Namespace) -> int:
    from sbmoe.core.distributed import distributed_session, parse_shard
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.retrieval.index_files import shard_directory
    from sbmoe.retrieval.indexing import index_corpus

    if args.store:
        from sbmoe.cli.store import command_index_store

        return command_index_store(args)
    config = IndexConfig(**given_values(args, IndexConfig))
    config.validate()
    encode = _encode_config(args)
    shard = parse_shard(args.shard) if args.shard else None
    collection = load_collection(resolve_data(args.data), splits=[])
    with distributed_session(encode.device) as context:
        if context.is_distributed:
            if shard is not None:
                raise UsageError("under torchrun each process indexes its own shard: leave out --shard")
            shard = (context.rank, context.world_size)
        check_output(args.output, SHARDED_INDEX if shard else INDEX)
        retriever = _load_retriever(args, context.device)
        index = index_corpus(
            retriever,
            collection,
            args.output,
            config,
            encode,
            shard=shard,
            show_progress=not args.quiet and context.is_main,
            command=args.command_line,
            cache=_cache(args),
            overwrite=args.overwrite,
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
    from sbmoe.retrieval.indexing import merge_index

    config = IndexConfig(**given_values(args, IndexConfig))
    config.validate()
    check_output(args.output, INDEX)
    merged = merge_index(args.index, args.output, config, command=args.command_line, overwrite=args.overwrite)
    shards = merged.metadata["merged_from_shards"]
    print(f"merged {shards} shards ({len(merged)} documents) into {args.output}")
    return 0


def _command_search(args: argparse.Namespace) -> int:
    from sbmoe.data.beir import read_queries
    from sbmoe.evaluation.metrics import write_trec_run
    from sbmoe.retrieval.search import describe_run, search

    config = SearchConfig(**given_values(args, SearchConfig))
    config.validate()
    encode = _encode_config(args)
    if args.output and Path(args.output).is_dir():
        raise UsageError(f"--output {args.output} is a directory; search writes its run to a file")
    if args.query and not all(query.strip() for query in args.query):
        raise UsageError("--query is empty: give the text to search for")
    queries = (
        read_queries(args.queries) if args.queries else {f"q{i}": q for i, q in enumerate(args.query, 1)}
    )
    retriever = _load_retriever(args, encode.device)
    run = search(retriever, args.index, queries, config, encode, verify=args.verify)
    if args.output:
        with output_lock(args.output):
            write_trec_run(run, args.output)
        print(f"wrote {args.output}")
    else:
        for row in describe_run(run, config.top_k):
            print(f"{row['query_id']}\t{row['rank']}\t{row['doc_id']}\t{row['score']:.4f}")
    return 0


def _command_serve(args: argparse.Namespace) -> int:
    from sbmoe.serve.http import serve

    config = ServeConfig(**given_values(args, ServeConfig))
    config.validate()
    search = SearchConfig(**given_values(args, SearchConfig))
    serve(
        args.model,
        args.index,
        config,
        search,
        _encode_config(args),
        data=args.data,
        verify=args.verify,
        log_level="warning" if args.quiet else "info",
        announce=lambda url: print(f"listening on {url}", flush=True),
    )
    return 0


def _command_demo(args: argparse.Namespace) -> int:
    from sbmoe.study.demo import run_demo

    model_overrides = given_values(args, ModelConfig)
    if args.model:
        model_overrides["backbone"] = args.model
    report = run_demo(
        args.output,
        model_overrides,
        given_values(args, TrainConfig),
        data=args.data,
        reference=args.reference,
        show_progress=not args.quiet,
        command=args.command_line,
    )
    print(report.to_markdown())
    print(f"(written to {Path(args.output) / 'demo.md'} and demo.json)")
    return 0


def _command_push(args: argparse.Namespace) -> int:
    from sbmoe.model.hub import push_model

    url = push_model(
        args.directory, args.repo_id, private=args.private, token=args.token, evaluations=args.evaluation
    )
    print(f"pushed {args.directory} to https://huggingface.co/{args.repo_id} ({url})")
    return 0


def _command_model_card(args: argparse.Namespace) -> int:
    from sbmoe.model.hub import write_model_card

    print(f"wrote {write_model_card(args.directory, args.evaluation)}")
    return 0


COMMANDS = {
    "train": _command_train,
    "evaluate": _command_evaluate,
    "index": _command_index,
    "merge-index": _command_merge_index,
    "search": _command_search,
    "serve": _command_serve,
    "demo": _command_demo,
    "experiment": _command_experiment,
    "report": _command_report,
    "push": _command_push,
    "model-card": _command_model_card,
    "convert-multidomain": _command_convert_multidomain,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sbmoe`` command.

    Problems the user can fix (:class:`~sbmoe.core.errors.SbmoeError`) end in one line and exit code 2;
    anything else is a bug and keeps its traceback.
    """
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
