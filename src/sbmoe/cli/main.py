"""The ``sbmoe`` entry point: the parser (one module per verb in this package) and error handling.

Only this package parses arguments or prints; each verb builds configs and calls one library
function, whose output gate (:func:`sbmoe.core.artifacts.writing_output`) does every check of what may
be written where.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence

from sbmoe import __version__
from sbmoe.cli import data, evaluate, hub, index, search, study, train
from sbmoe.core.errors import SbmoeError

DESCRIPTION = "Dense retrieval with a single-block Mixture-of-Experts head: train, index, search, evaluate."
# In --help's order.
VERB_MODULES = (train, evaluate, index, search, study, hub, data)
# Flags whose value is I/N: a value starting with '-' (-1/2) would be taken for a flag by argparse.
_FRACTION_FLAGS = ("--shard", "--worker")


def build_parser() -> argparse.ArgumentParser:
    """The ``sbmoe`` parser: flags are generated from the config dataclasses (see ``sbmoe.config``)."""
    parser = argparse.ArgumentParser(prog="sbmoe", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"sbmoe {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in VERB_MODULES:
        module.register(commands)
    return parser


def _join_fraction_values(argv: list[str]) -> list[str]:
    """``--shard -1/2`` -> ``--shard=-1/2``, so that the value reaches its check and its message."""
    joined, position = [], 0
    while position < len(argv):
        token = argv[position]
        following = argv[position + 1] if position + 1 < len(argv) else None
        if (
            token in _FRACTION_FLAGS
            and following is not None
            and following.startswith("-")
            and "/" in following
        ):
            joined.append(f"{token}={following}")
            position += 2
            continue
        joined.append(token)
        position += 1
    return joined


def _set_up_the_screen(quiet: bool) -> None:
    """What a command prints besides its own output: sbmoe's log lines and no library chatter.

    Warnings print as one line each while the command runs (:func:`_warnings_in_one_line`).
    """
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(message)s")
    import transformers

    # Our own bars show the work; per-file "Loading weights" bars from transformers are noise here.
    transformers.utils.logging.disable_progress_bar()
    # faiss logs each CPU-specific library it tries to load; matplotlib, its font cache.
    for chatty in ("sentence_transformers", "faiss.loader", "matplotlib"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    # pymilvus and Milvus Lite log each failed call, traceback and all, and then raise it: the error
    # raised is what sbmoe reports (in one line, when the user can fix it).
    for logs_then_raises in (
        "pymilvus.decorators",
        "milvus_lite.adapter.grpc.servicer",
        "milvus_lite.server_manager",
    ):
        logging.getLogger(logs_then_raises).addFilter(_below_error)


def _below_error(record: logging.LogRecord) -> bool:
    return record.levelno < logging.ERROR


@contextlib.contextmanager
def _warnings_in_one_line() -> Iterator[None]:
    """Inside the block, a warning prints as one line (what happened and what to do), not with
    the file, line and source that raised it. Only the text changes: warnings are still warnings
    (filters and ``pytest.warns`` see them)."""
    default = warnings.formatwarning
    warnings.formatwarning = lambda message, *_, **__: f"warning: {message}\n"
    try:
        yield
    finally:
        warnings.formatwarning = default


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``sbmoe`` command.

    Problems the user can fix (:class:`~sbmoe.core.errors.SbmoeError`) end in one line and exit code 2;
    anything else is a bug and keeps its traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_join_fraction_values(argv))
    args.command_line = ["sbmoe", *argv]
    _set_up_the_screen(quiet=args.quiet)
    try:
        with _warnings_in_one_line():
            return args.run(args)
    except SbmoeError as error:
        print(f"sbmoe {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
