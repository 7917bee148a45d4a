"""What several verbs share: the flags they have in common, and turning parsed flags into configs,
job options and the model.

Only the standard library and ``sbmoe.config`` are imported at module level, so that ``sbmoe --help``
answers at once; each verb imports the heavy parts (torch, the library) when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from sbmoe.cli.flags import add_config_flags, given_values, preset_default_describer
from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.config.presets import PRESETS
from sbmoe.config.train import TrainConfig
from sbmoe.core.errors import UsageError


def add_verb(commands: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """A subcommand parser, with ``-q`` accepted after the verb too."""
    parser = commands.add_parser(name, help=help_text, description=help_text)
    # SUPPRESS keeps a -q given before the verb.
    parser.add_argument(
        "-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars"
    )
    return parser


def add_model_flag(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--model", required=True, help=help_text)


def add_data_flag(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--data",
        required=required,
        help="BEIR folder, or a collection name looked up in $SBMOE_DATA_DIR, then the cache "
        "(~/.cache/sbmoe/data), then downloaded from the BEIR mirror, or irds:ID (an ir_datasets "
        "id such as irds:beir/scifact/test)",
    )


def add_cache_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        help="pooled-embedding cache, reused by models sharing a backbone (default: none; "
        "--head-only uses $SBMOE_CACHE_DIR/embeddings or ~/.cache/sbmoe/embeddings)",
    )


def add_overwrite_flag(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help=f"replace an earlier {what} at --output made with other settings (without it that is "
        "refused; anything else at --output is always refused)",
    )


def add_model_and_train_flags(parser: argparse.ArgumentParser, preset_note: str) -> None:
    model = parser.add_argument_group(f"model {preset_note}")
    add_config_flags(
        model, ModelConfig, skip={"backbone"}, describe_default=preset_default_describer(PRESETS, "model")
    )
    train = parser.add_argument_group(f"training {preset_note}")
    add_config_flags(train, TrainConfig, describe_default=preset_default_describer(PRESETS, "train"))


def add_length_overrides(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("token limits (none given: the model's own)")
    add_config_flags(
        group,
        ModelConfig,
        only=("max_query_length", "max_doc_length"),
        describe_default=lambda _: "default: the model's",
    )


def add_encode_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser.add_argument_group("encoding"), EncodeConfig)


def add_evaluation_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--evaluation",
        action="append",
        default=[],
        metavar="DIR",
        help="add the test metrics of an `sbmoe evaluate` output of this model to the card (repeatable)",
    )


def config_from(args: argparse.Namespace, config_class: type) -> Any:
    """The config of ``config_class`` with the flags given, validated."""
    config = config_class(**given_values(args, config_class))
    config.validate()
    return config


def job_options(args: argparse.Namespace, show_progress: bool = True) -> JobOptions:
    """The options of a job run from the command line (``show_progress`` off: not this process's bars)."""
    cache = None
    if getattr(args, "cache_dir", None):
        from sbmoe.inference.cache import EmbeddingCache

        path = Path(args.cache_dir)
        blocking = next((folder for folder in (path, *path.parents) if folder.exists()), path)
        if not blocking.is_dir():  # before, a FileExistsError traceback once the model was loaded
            raise UsageError(f"--cache-dir {path}: {blocking} is a file, not a folder; give a folder")
        cache = EmbeddingCache(args.cache_dir)
    return JobOptions(
        show_progress=show_progress and not args.quiet,
        command=args.command_line,
        cache=cache,
        overwrite=getattr(args, "overwrite", False),
    )


def load_retriever(args: argparse.Namespace, device: Any) -> Any:
    """The model of ``--model``, with the token limits given on the command line (evaluate, index)."""
    from sbmoe.model.retriever import Retriever

    retriever = Retriever.load(args.model, device=device)
    limits = given_values(args, ModelConfig, ("max_query_length", "max_doc_length"))
    if limits:
        retriever.config = dataclasses.replace(retriever.config, **limits)
        retriever.config.validate()
    return retriever
