"""``sbmoe convert-multidomain``: a Multi-Domain Benchmark collection as a BEIR folder."""

from __future__ import annotations

import argparse
from typing import Any

from sbmoe.cli.common import add_verb


def register(commands: Any) -> None:
    convert = add_verb(
        commands, "convert-multidomain", "convert a Multi-Domain Benchmark collection to a BEIR folder"
    )
    convert.add_argument(
        "source", help="extracted release folder (holding collection.jsonl, train/, val/, test/)"
    )
    convert.add_argument(
        "--output", required=True, help="BEIR folder to write, e.g. $SBMOE_DATA_DIR/political-science"
    )
    convert.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from sbmoe.data.multidomain import convert_multidomain

    print(f"wrote {convert_multidomain(args.source, args.output)}")
    return 0
