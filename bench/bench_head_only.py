"""Training speed: one epoch of head-only training (cached embeddings) against full fine-tuning.

SB-MoE with all-MiniLM-L6-v2 (6 experts) on SciFact's training pairs, batch 32, max length 256,
the default precision. Head-only runs whole epochs (median of ``--repeats``); full fine-tuning is
timed over ``--full-steps`` steps (median step time x steps per epoch) unless ``--full-epoch``.
The one-time encoding that fills the cache is reported separately.

    .venv/bin/python bench/bench_head_only.py [--full-steps 5] [--full-epoch]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import machine, median_seconds, scifact

from sbmoe.config.jobs import JobOptions
from sbmoe.config.presets import build_configs
from sbmoe.core.runtime import seed_everything
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.model.retriever import Retriever
from sbmoe.training.trainer import Trainer, build_trainer


def make_trainer(collection, output, cache, **train_overrides) -> Trainer:
    model_config, train_config = build_configs(
        "default", {"backbone": "all-MiniLM-L6-v2", "num_experts": 6}, {"epochs": 1, **train_overrides}
    )
    seed_everything(0)
    return build_trainer(
        Retriever.from_config(model_config),
        collection,
        train_config,
        output,
        JobOptions(show_progress=False, cache=cache),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full-steps", type=int, default=5, help="full fine-tuning steps timed")
    parser.add_argument("--full-epoch", action="store_true", help="time a whole full fine-tuning epoch")
    parser.add_argument("--repeats", type=int, default=3, help="head-only epochs timed (median)")
    args = parser.parse_args()
    collection = scifact()
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as scratch:
        cache = EmbeddingCache(f"{scratch}/cache")
        started = time.perf_counter()
        head_only = make_trainer(collection, f"{scratch}/head", cache, head_only=True)
        encode_seconds = time.perf_counter() - started
        batches = head_only.batch_order(0, len(head_only.data.pairs))
        print(
            f"SciFact: {len(head_only.data.pairs)} training pairs, {len(batches)} steps per epoch, batch 32; "
            f"precision {head_only.precision}"
        )

        def head_epoch():
            for batch in batches:
                head_only.training_step(batch)

        head_seconds, _ = median_seconds(head_epoch, args.repeats)

        full = make_trainer(collection, f"{scratch}/full", None)
        full.training_step(batches[0])  # warm-up
        steps = batches if args.full_epoch else batches[1 : 1 + args.full_steps]
        timings = []
        for batch in steps:
            began = time.perf_counter()
            full.training_step(batch)
            timings.append(time.perf_counter() - began)
        full_epoch = sum(timings) if args.full_epoch else statistics.median(timings) * len(batches)
        how = "measured" if args.full_epoch else f"median of {len(timings)} steps x {len(batches)}"

    print(
        f"one-time pooled encoding of {len(collection.corpus)} passages + {len(collection.queries)} queries "
        f"(fills the cache): {encode_seconds:.1f} s"
    )
    print(f"head-only epoch: {head_seconds:.2f} s (median of {args.repeats})")
    print(f"full fine-tuning epoch: {full_epoch:.1f} s ({how})")
    print(f"speed-up per epoch: {full_epoch / head_seconds:.0f}x (target >= 50x)")
    print(f"torch threads: {torch.get_num_threads()}")


if __name__ == "__main__":
    main()
