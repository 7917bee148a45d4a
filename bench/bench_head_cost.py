"""Cost of the MoE head when encoding, against the same model without the head.

Encodes SciFact passages with all-MiniLM-L6-v2 at max length 256 (default precision). Two views:

1. end to end: full encodes with no head and with a 6-expert head (top1, all), interleaved,
   median of ``--repeats`` (on a shared machine a few percent of run-to-run noise remain);
2. in isolation: the stages after pooling (head + normalisation, against normalisation alone, in
   float32 as encoding runs them) timed on the pooled embeddings of the same passages, as a share
   of the backbone's time.

    .venv/bin/python bench/bench_head_cost.py [--passages 1000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from common import machine, median_seconds, scifact

from sbmoe.config.jobs import EncodeConfig
from sbmoe.config.model import ModelConfig
from sbmoe.core.runtime import resolve_precision
from sbmoe.inference.encoding import apply_head_stages, encode_pooled, encode_texts
from sbmoe.model.retriever import Retriever


def head_seconds(retriever: Retriever, pooled: np.ndarray) -> float:
    """Time of the stages after pooling over all passages, run as encoding runs them."""
    started = time.perf_counter()
    apply_head_stages(retriever, pooled, "document")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", default="auto")
    args = parser.parse_args()
    collection = scifact()
    texts = [doc.full_text for doc in list(collection.corpus.values())[: args.passages]]
    precision = resolve_precision(args.precision, "cpu")
    encode = EncodeConfig(precision=precision)
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
    print(f"{len(texts)} passages, max length 256, precision {precision}, median of {args.repeats}")

    timings: dict[str, list[float]] = {name: [] for name in settings}
    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        for name, (retriever, rule) in settings.items():
            if rule is not None:
                retriever.head.expert_pooling = rule
            started = time.perf_counter()
            encode_texts(retriever, texts, "document", encode)
            timings[name].append(time.perf_counter() - started)
    base = statistics.median(timings["no head"][1:])
    print("\nend to end:")
    for name, values in timings.items():
        seconds = statistics.median(values[1:])
        print(
            f"  {name:18s} {seconds:6.2f} s  {len(texts) / seconds:6.1f} passages/s  "
            f"overhead {100 * (seconds / base - 1):+.1f}%"
        )

    pooled = encode_pooled(plain, texts, "document", encode)
    backbone, _ = median_seconds(lambda: encode_pooled(plain, texts, "document", encode), 1)
    normalize_only, _ = median_seconds(lambda: head_seconds(plain, pooled), args.repeats)
    print(f"\nin isolation (backbone up to pooling: {backbone:.2f} s):")
    print(f"  normalisation only: {1000 * normalize_only:.1f} ms")
    for rule in ("top1", "all"):
        with_head.head.expert_pooling = rule
        seconds, _ = median_seconds(lambda: head_seconds(with_head, pooled), args.repeats)
        extra = seconds - normalize_only
        print(
            f"  head ({rule}) + normalisation: {1000 * seconds:.1f} ms -> head costs "
            f"{100 * extra / backbone:.2f}% of encoding (target <= 3%)"
        )


if __name__ == "__main__":
    main()
