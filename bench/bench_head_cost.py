"""Cost of the MoE head when encoding: the same backbone with and without the head.

Encodes SciFact passages with all-MiniLM-L6-v2 at max length 256 with no head and with a 6-expert
head (top1 and all), median of ``--repeats``, interleaved so drift hits all settings alike.

    .venv/bin/python bench/bench_head_cost.py [--passages 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from common import machine, scifact

from sbmoe.config import ModelConfig
from sbmoe.encoding import encode_texts
from sbmoe.modeling import Retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    collection = scifact()
    texts = [doc.full_text for doc in list(collection.corpus.values())[: args.passages]]
    torch.manual_seed(0)
    plain = Retriever.from_config(ModelConfig(num_experts=0))
    with_head = Retriever.from_config(ModelConfig(num_experts=6))
    with_head.model[0].load_state_dict(plain.model[0].state_dict())
    settings = {
        "no head": (plain, None),
        "6 experts, top1": (with_head, "top1"),
        "6 experts, all": (with_head, "all"),
    }
    print(f"machine: {machine()}")
    print(f"{len(texts)} passages, max length 256, precision {args.precision}, median of {args.repeats}")
    timings: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, (retriever, rule) in settings.items():
            if rule is not None:
                retriever.head.expert_pooling = rule
            started = time.perf_counter()
            encode_texts(retriever, texts, "document", precision=args.precision)
            timings[name].append(time.perf_counter() - started)
    base = statistics.median(timings["no head"][1:])
    for name, values in timings.items():
        seconds = statistics.median(values[1:])
        print(
            f"{name:18s} {seconds:6.2f} s  {len(texts) / seconds:6.1f} passages/s  "
            f"overhead {100 * (seconds / base - 1):+.1f}% (target <= 3%)"
        )


if __name__ == "__main__":
    main()
