"""Memory: gradient caching against plain training steps on the same large batch.

all-MiniLM-L6-v2 + SB-MoE (6 experts), SciFact training pairs, 256-token documents, one BM25 hard
negative per query. Each setting runs in a fresh process: two training steps are timed, and the
memory the steps add is the process's peak resident size minus its size just before the first step
(model, data and optimiser are loaded by then). Reference: the same batch without the cache.

    .venv/bin/python bench/bench_grad_cache.py [--batch-size 32] [--chunk-size 8]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

from common import machine, scifact

from sbmoe.config.jobs import JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.core.runtime import seed_everything
from sbmoe.model.retriever import Retriever
from sbmoe.training.trainer import build_trainer

STEPS = 2


def resident_mib() -> float:
    with open("/proc/self/statm", encoding="utf-8") as handle:
        pages = int(handle.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(batch_size: int, chunk_size: int) -> dict[str, float]:
    """Run ``STEPS`` steps in this process; the step memory and the median step time."""
    model_config, train_config = build_configs(
        "default",
        {"backbone": "all-MiniLM-L6-v2", "num_experts": 6, "max_doc_length": 256},
        {
            "batch_size": batch_size,
            "grad_cache_chunk_size": chunk_size,
            "hard_negatives": 1,
            "checkpoint_steps": None,
        },
    )
    seed_everything(0)
    with tempfile.TemporaryDirectory() as output:
        trainer = build_trainer(
            Retriever.from_config(model_config),
            scifact(),
            train_config,
            output,
            JobOptions(show_progress=False),
        )
        batches = trainer.batches(0)[:STEPS]
        before = resident_mib()
        timings = []
        for batch in batches:
            started = time.perf_counter()
            trainer.training_step(batch)
            timings.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"step_mib": peak - before, "step_seconds": sorted(timings)[len(timings) // 2]}


def run_child(batch_size: int, chunk_size: int) -> dict[str, float]:
    command = [sys.executable, __file__, "--measure", str(batch_size), str(chunk_size)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--chunk-size", type=int, default=8)
    parser.add_argument("--measure", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(*args.measure)))
        return
    print(f"machine: {machine()}")
    print(
        f"batch {args.batch_size} pairs + {args.batch_size} hard negatives, 256 tokens, "
        f"{STEPS} steps, each setting in a fresh process"
    )
    plain = run_child(args.batch_size, 0)
    cached = run_child(args.batch_size, args.chunk_size)
    print(f"{'setting':<32}{'step memory MiB':>18}{'s / step':>10}")
    print(f"{'plain (reference)':<32}{plain['step_mib']:>18.0f}{plain['step_seconds']:>10.2f}")
    label = f"gradient cache, chunks of {args.chunk_size}"
    print(f"{label:<32}{cached['step_mib']:>18.0f}{cached['step_seconds']:>10.2f}")
    print(
        f"memory ratio (cached / plain): {cached['step_mib'] / plain['step_mib']:.2f}; "
        f"time ratio: {cached['step_seconds'] / plain['step_seconds']:.2f}"
    )


if __name__ == "__main__":
    main()
