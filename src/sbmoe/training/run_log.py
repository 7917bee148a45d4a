"""What a training run tells the people watching it: its log, a start-up line, optionally TensorBoard.

The trainer writes every record through one :class:`RunLog`: a line of ``training/log.jsonl`` and,
with ``report_to="tensorboard"`` it turns them into scalars under ``training/tensorboard/``
(``tensorboard --logdir OUTPUT/training/tensorboard``): the loss terms and learning rates per step,
dev nDCG@10 per evaluation, and the experts' shares of the texts per epoch.
"""

from __future__ import annotations

import json
import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sbmoe.core.errors import UsageError
from sbmoe.core.layouts import TRAINING_FILES

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
# Record keys that are positions or labels, not values to plot.
_NOT_SCALARS = frozenset({"step", "epoch", "event", "lr", "seconds"})


def startup_line(record: Mapping[str, Any]) -> str:
    """The start-up record as one line for the log."""
    r = record
    negatives = f" + {r['hard_negatives']} hard negatives/query" if r["hard_negatives"] else ""
    resumed = f"; resuming at step {r['resumed_from_step']}" if r["resumed_from_step"] else ""
    return (
        f"training on {r['data']}: {r['training_pairs']} pairs, {r['dev_queries']} dev queries "
        f"({r['dev_set']}); {r['steps_per_epoch']} steps/epoch, {r['total_steps']} steps of batch "
        f"{r['batch_size']}{negatives} ({r['processes']} process(es)); {r['device']} {r['precision']} "
        f"({r['backend']}; dev evaluation {r['dev_backend']}); head: {r['head']}; trains "
        f"{r['trains']}; output {r['output_dir']}{resumed}"
    )


class TrainingReporter:
    """Mirrors the records of ``log.jsonl`` to TensorBoard (or nowhere, under ``report_to="none"``).

    Args:
        report_to: ``none`` or ``tensorboard``.
        log_dir: Where the event files go.
        lr_names: Name of each learning rate of a ``train`` record's ``lr`` list (the optimiser's
            parameter groups).
        purge_step: On resume, the events a killed run wrote from this step on are dropped, as the
            steps after the checkpoint run again.

    Raises:
        UsageError: ``tensorboard`` without the tensorboard package installed.
    """

    def __init__(
        self,
        report_to: str = "none",
        log_dir: str | Path = TENSORBOARD_DIR,
        lr_names: Sequence[str] = (),
        purge_step: int | None = None,
    ) -> None:
        self.lr_names = list(lr_names)
        self.writer = None
        if report_to == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as error:
                raise UsageError(
                    "--report-to tensorboard needs the tensorboard package: pip install 'sbmoe[tensorboard]'"
                ) from error
            self.writer = SummaryWriter(str(log_dir), purge_step=purge_step)

    def record(self, record: Mapping[str, Any]) -> None:
        """Write the plottable values of one ``log.jsonl`` record."""
        if self.writer is None:
            return
        step, event = record["step"], record.get("event")
        if event == "start":
            table = "\n".join(f"| {key} | {value} |" for key, value in record.items() if key != "event")
            self.writer.add_text("start", "| setting | value |\n| --- | --- |\n" + table, step)
            return
        for name, value in record.items():
            if name in _NOT_SCALARS:
                continue
            if isinstance(value, numbers.Real) and not isinstance(value, bool):
                self.writer.add_scalar(f"{event}/{name}", value, step)
            elif isinstance(value, list) and name.startswith("usage_"):
                for expert, share in enumerate(value):
                    self.writer.add_scalar(f"{event}/{name}/expert_{expert}", share, step)
        if "lr" in record:
            for name, rate in zip(self.lr_names, record["lr"], strict=True):
                self.writer.add_scalar(f"lr/{name}", rate, step)

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def collapse_warnings(summary: Mapping[str, Any], threshold: float, epoch: int) -> list[str]:
    """A warning for each kind of text (queries, documents) of which one expert took over ``threshold``.

    Args:
        summary: An epoch's routing summary (:meth:`~sbmoe.inference.routing.RoutingTracker.summary`).
        threshold: The largest share of one expert that is not a collapse.
        epoch: The epoch, for the message.
    """
    messages = []
    for kind in ("queries", "documents"):
        usage = summary.get(f"usage_{kind}")
        if usage is None:
            continue  # documents under a query-side head are not routed
        share = max(usage)
        if share > threshold:
            messages.append(
                f"expert collapse: expert {usage.index(share)} took {share:.0%} of the {kind} in epoch "
                f"{epoch} (threshold {threshold:.0%}); consider load balancing (--load-balancing-coef) or "
                "expert dropout"
            )
    return messages


class RunLog:
    """The run's log: each record a line of ``log.jsonl``, mirrored by a :class:`TrainingReporter`.

    Only one process of a data-parallel job writes (``writes``); on the others every method does
    nothing.

    Args:
        training_dir: The run's ``training/`` folder.
        writes: Whether this process writes the log.
    """

    def __init__(self, training_dir: str | Path, writes: bool = True) -> None:
        self.path = Path(training_dir) / TRAINING_FILES.log
        self.writes = writes
        self.reporter = TrainingReporter()

    def open(self, report_to: str, lr_names: Sequence[str], resumed_from: int | None) -> None:
        """Start reporting to ``report_to`` (see :class:`TrainingReporter`) from step ``resumed_from``."""
        if self.writes:
            directory = self.path.parent / TENSORBOARD_DIR
            self.reporter = TrainingReporter(report_to, directory, lr_names, purge_step=resumed_from)

    def record(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` to the log and report it."""
        if not self.writes:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.reporter.record(record)

    def size(self) -> int:
        """The log's length in bytes (0 before the first record)."""
        try:
            return os.path.getsize(self.path)
        except FileNotFoundError:
            return 0

    def cut(self, size: int) -> None:
        """Cut the log back to ``size`` bytes (a resumed run takes the steps after its checkpoint again)."""
        if self.writes and self.path.exists():
            with open(self.path, "r+b") as handle:
                handle.truncate(size)

    def close(self) -> None:
        """Close the reporter (flushing TensorBoard's events)."""
        self.reporter.close()
