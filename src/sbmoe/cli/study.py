"""The study's verbs: ``sbmoe demo``, ``sbmoe experiment`` (a grid of cells) and ``sbmoe report``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from sbmoe.cli.common import add_data_flag, add_model_and_train_flags, add_verb, config_from, job_options
from sbmoe.cli.flags import add_config_flags, given_values
from sbmoe.config.jobs import ReportConfig
from sbmoe.config.model import ModelConfig
from sbmoe.config.train import TrainConfig


def register(commands: Any) -> None:
    demo = add_verb(commands, "demo", "zero-shot vs fine-tuned vs SB-MoE on SciFact, in one table")
    demo.add_argument("--model", help="backbone (default: the demo's, all-MiniLM-L6-v2)")
    add_data_flag(demo, required=False)
    demo.add_argument("--output", default="runs/demo", help="results directory (default: runs/demo)")
    demo.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also encode with sentence-transformers' own encode, the row zero-shot must match (default: on)",
    )
    add_model_and_train_flags(demo, "(none given: the demo grid's own settings)")
    demo.set_defaults(run=run_demo)

    experiment = add_verb(commands, "experiment", "run a grid of train -> evaluate cells (resumable)")
    experiment.add_argument("grid", help="experiment file (YAML), e.g. experiments/scifact-cpu.yaml")
    experiment.add_argument("--output", help="results directory (default: runs/<grid name>)")
    experiment.add_argument("--list", action="store_true", help="print the cells (this worker's) and exit")
    experiment.add_argument(
        "--worker",
        default="0/1",
        metavar="I/N",
        help="be worker I (from 0) of N sharing one --output: run only cells I, I+N, I+2N, ... "
        "(default: %(default)s)",
    )
    # The old spelling, refused with a hint: `index --shard` means consecutive slices, this did not.
    experiment.add_argument("--shard", help=argparse.SUPPRESS)
    experiment.set_defaults(run=run_experiment)

    report = add_verb(commands, "report", "tables, significance tests and plots of an experiment")
    report.add_argument("directory", help="an experiment's output directory")
    report.add_argument("--output", help="where to write the report (default: DIRECTORY/report)")
    add_config_flags(report, ReportConfig)
    report.set_defaults(run=run_report)


def run_experiment(args: argparse.Namespace) -> int:
    from sbmoe.core.distributed import parse_shard
    from sbmoe.core.errors import UsageError
    from sbmoe.study.experiments import run_experiment
    from sbmoe.study.grid import expand, load_grid

    if args.shard is not None:
        raise UsageError(f"experiment --shard is now --worker {args.shard} (cells I, I+N, ... of the grid)")
    worker = parse_shard(args.worker, "--worker")
    grid = load_grid(args.grid)
    if args.list:
        for cell in expand(grid)[worker[0] :: worker[1]]:
            print(cell.cell_id)
        return 0
    output = args.output or f"runs/{grid.name}"
    summary = run_experiment(grid, output, job_options(args), worker=worker)
    print(
        f"{len(summary.finished)} cells run, {len(summary.skipped)} already finished, "
        f"{len(summary.failed)} failed ({summary.seconds:.0f} s); results in {output}"
    )
    for cell_id, error in summary.failed.items():
        print(f"  failed: {cell_id}: {error} (see {output}/cells/{cell_id}/error.json)")
    return 1 if summary.failed else 0


def run_report(args: argparse.Namespace) -> int:
    from sbmoe.study.report import build_report, write_report

    config = config_from(args, ReportConfig)
    report = build_report(args.directory, config)
    target = Path(args.output or Path(args.directory) / "report")
    written = write_report(report, target, plots=config.plots, timing=config.timing)
    print(report.to_report(timing=config.timing).to_markdown())
    print("written: " + ", ".join(str(path) for path in written))
    return 0


def run_demo(args: argparse.Namespace) -> int:
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
        options=job_options(args),
    )
    print(report.to_markdown())
    print(f"(written to {Path(args.output) / 'demo.md'} and demo.json)")
    return 0
