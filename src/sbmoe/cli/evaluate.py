"""``sbmoe evaluate``: search a split's queries over the corpus and score the run."""

from __future__ import annotations

import argparse
from typing import Any

from sbmoe.cli.common import (
    add_cache_flag,
    add_data_flag,
    add_encode_flags,
    add_length_overrides,
    add_model_flag,
    add_overwrite_flag,
    add_verb,
    config_from,
    job_options,
    load_retriever,
)
from sbmoe.cli.flags import add_config_flags
from sbmoe.config.jobs import EncodeConfig, EvaluateConfig


def register(commands: Any) -> None:
    parser = add_verb(commands, "evaluate", "search a split's queries over the corpus and score the run")
    add_model_flag(parser, "saved model directory, hub name or all-MiniLM-L6-v2")
    add_data_flag(parser)
    parser.add_argument(
        "--output", required=True, help="directory for metrics.json, per_query.json, run.trec"
    )
    add_overwrite_flag(parser, "evaluation")
    add_config_flags(parser.add_argument_group("evaluation"), EvaluateConfig)
    add_length_overrides(parser)
    add_encode_flags(parser)
    add_cache_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sbmoe.core.layouts import EVALUATION_FILES
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.evaluation.evaluate import evaluate_model
    from sbmoe.evaluation.query_groups import splits_to_load
    from sbmoe.evaluation.tables import metric_label

    config = config_from(args, EvaluateConfig)
    encode = config_from(args, EncodeConfig)
    root = resolve_data(args.data)
    # The train split too, when there is one: it tells seen from unseen queries (evaluation.query_groups).
    collection = load_collection(root, splits=splits_to_load(root, config.split))
    retriever = load_retriever(args, encode.device)
    outputs = evaluate_model(retriever, collection, args.output, config, encode, job_options(args))
    for output in outputs:
        scores = "  ".join(
            f"{metric_label(name)} {value:.4f}" for name, value in output.result.metrics.items()
        )
        print(f"{output.name}: {scores}  ({output.output_dir / EVALUATION_FILES.metrics})")
        for group, summary in (output.query_groups or {}).items():
            means = "  ".join(f"{metric_label(m)} {v:.4f}" for m, v in summary.items() if m != "num_queries")
            print(f"  {group} queries (n={summary['num_queries']}): {means or '-'}")
    return 0
