"""Shared pieces of the benchmarks: machine description, timing, the SciFact collection."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from sbmoe.core.cpu import cpu_description
from sbmoe.data.beir import BeirCollection, load_collection, resolve_data


def machine() -> str:
    """One line describing where the numbers come from: the CPU class (model and flags) first."""
    return (
        f"{cpu_description()}; torch {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d')}"
    )


def median_seconds(run: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls, and the last call's result."""
    timings, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = run()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), result


def scifact(name: str = "scifact") -> BeirCollection:
    return load_collection(resolve_data(name))
