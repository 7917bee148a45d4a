"""An expert-count sweep on SciFact with the embedding cache and head-only training.

Trains SB-MoE heads (learned gating) on a frozen all-MiniLM-L6-v2 for 3, 6, 9 and 12 experts with
top1 and all pooling, selects each on dev, and evaluates it on SciFact test; the corpus is encoded
once (into a fresh cache, so its time is included) and every cell reuses it.

    .venv/bin/python bench/bench_sweep.py [--epochs 10] [--experts 3 6 9 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time

from common import machine, scifact

from sbmoe.config.jobs import EvaluateConfig, JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.evaluation.evaluate import evaluate_model
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.model.retriever import Retriever
from sbmoe.training.trainer import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--experts", type=int, nargs="+", default=[3, 6, 9, 12])
    parser.add_argument("--rules", nargs="+", default=["top1", "all"])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    started = time.perf_counter()
    collection = scifact()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        cache = EmbeddingCache(f"{scratch}/cache")
        zero_shot = evaluate_model(
            Retriever.load("all-MiniLM-L6-v2"),
            collection,
            f"{scratch}/zero-shot",
            EvaluateConfig(),
            options=JobOptions(show_progress=False, cache=cache),
        )[0]
        rows.append(("zero-shot", "-", zero_shot.result.metrics["ndcg@10"], time.perf_counter() - started))
        for experts in args.experts:
            for rule in args.rules:
                began = time.perf_counter()
                model_config, train_config = build_configs(
                    "default",
                    {"backbone": "all-MiniLM-L6-v2", "num_experts": experts, "expert_pooling": rule},
                    {"epochs": args.epochs, "head_only": True},
                )
                output = f"{scratch}/n{experts}-{rule}"
                train(
                    model_config,
                    train_config,
                    collection,
                    output,
                    JobOptions(show_progress=False, cache=cache),
                )
                result = evaluate_model(
                    Retriever.load(output),
                    collection,
                    f"{output}/test",
                    EvaluateConfig(),
                    options=JobOptions(show_progress=False, cache=cache),
                )[0]
                rows.append((experts, rule, result.result.metrics["ndcg@10"], time.perf_counter() - began))
                print(
                    f"  {experts:2d} experts, {rule}: nDCG@10 {rows[-1][2]:.4f} ({rows[-1][3]:.1f} s)",
                    flush=True,
                )
    total = time.perf_counter() - started
    print(f"\nhead-only, {args.epochs} epochs per cell, best dev checkpoint, SciFact test\n")
    print("| experts | pooling | nDCG@10 | seconds |\n|---:|---|---:|---:|")
    for experts, rule, ndcg, seconds in rows:
        print(f"| {experts} | {rule} | {ndcg:.4f} | {seconds:.1f} |")
    print(f"\nwall time, one-time encoding included: {total:.0f} s = {total / 60:.1f} min (target <= 5 min)")


if __name__ == "__main__":
    main()
