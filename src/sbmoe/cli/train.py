"""``sbmoe train``: fine-tune a retriever (with or without an MoE head); resumes if interrupted."""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from sbmoe.cli.common import (
    add_cache_flag,
    add_data_flag,
    add_model_and_train_flags,
    add_model_flag,
    add_overwrite_flag,
    add_verb,
    job_options,
)
from sbmoe.cli.flags import add_config_flags, given_values
from sbmoe.config.jobs import EncodeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.config.presets import PRESETS
from sbmoe.config.train import TrainConfig


def register(commands: Any) -> None:
    parser = add_verb(
        commands, "train", "fine-tune a retriever (with or without an MoE head); resumes if interrupted"
    )
    add_model_flag(parser, ModelConfig.__dataclass_fields__["backbone"].metadata["help"])
    add_data_flag(parser, required=False)
    parser.add_argument(
        "--output", required=True, help="directory for the model and training/ (resumes if interrupted)"
    )
    add_overwrite_flag(parser, "training run")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="default",
        help="; ".join(f"{name}: {p.description}" for name, p in PRESETS.items()) + " (default: default)",
    )
    add_model_and_train_flags(parser, "(defaults come from --preset)")
    add_config_flags(
        parser,
        EncodeConfig,
        only={"device"},
        describe_default=lambda _: (
            "default: auto; under torchrun each process trains its slice of every "
            "batch, so the global batch is --batch-size x processes"
        ),
    )
    add_cache_flag(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sbmoe.config.presets import build_configs
    from sbmoe.core.distributed import distributed_session
    from sbmoe.data.beir import load_collection, resolve_data
    from sbmoe.training.trainer import train

    model_config, train_config = build_configs(
        args.preset,
        {**given_values(args, ModelConfig), "backbone": args.model},
        given_values(args, TrainConfig),
    )
    # No --data: train_config.train_file names a training file, which train() reads.
    collection = load_collection(resolve_data(args.data)) if args.data else None
    # Under torchrun: joins the process group; rank 0 alone writes, logs and prints.
    with distributed_session(args.device or "auto") as context:
        if not context.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        result = train(model_config, train_config, collection, args.output, job_options(args), context)
    if context.is_main:
        print(json.dumps(result.to_dict(), indent=2))
    return 0
