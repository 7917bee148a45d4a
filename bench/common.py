"""Shared pieces of the benchmarks: machine description, timing, the SciFact collection."""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable

import torch

from sbmoe.data import BeirCollection, load_collection, resolve_data
from sbmoe.encoding import cpu_has_fast_bf16


def machine() -> str:
    """One line describing where the numbers come from."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return (
        f"{cpu}; {os.cpu_count()} cores, torch {torch.get_num_threads()} threads, torch {torch.__version__}, "
        f"fast bf16: {cpu_has_fast_bf16()}, {time.strftime('%Y-%m-%d')}"
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
