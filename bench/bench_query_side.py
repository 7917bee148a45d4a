"""Adapting without re-indexing: a query-side head against a symmetric head that must re-index.

Starts where a deployed retriever stands: all-MiniLM-L6-v2 has indexed SciFact's corpus (its pooled
embeddings are cached, as head-only training needs). Then, timed, in one run and side by side:

- query side: train an SB-MoE head on the query tower (head-only, cached embeddings) and evaluate
  the test split; the backbone's documents stay, so nothing is re-encoded;
- both sides: train the same head on both towers (head-only, cached embeddings), then re-index the
  corpus with the new model (backbone + head, from the texts: a deployed index keeps final
  embeddings, not pooled ones) and evaluate the test split on it.

Prints wall time per phase, documents encoded by the backbone, nDCG@10, and the ratio.

    .venv/bin/python bench/bench_query_side.py [--epochs 10] [--max-docs N]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import machine, scifact

import sbmoe.inference.encoding as encoding
from sbmoe.config.jobs import EncodeConfig, JobOptions, SearchConfig
from sbmoe.config.presets import build_configs
from sbmoe.data.beir import BeirCollection
from sbmoe.evaluation.metrics import evaluate_run
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import encode_pooled
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval import open_index
from sbmoe.retrieval.indexing import build_index
from sbmoe.retrieval.search import search
from sbmoe.training.trainer import train

ENCODE = EncodeConfig(encode_batch_size=128)


def count_backbone_texts() -> dict[str, int]:
    """Wrap the backbone's batch runner to count the texts it encodes, by kind."""
    counts = {"query": 0, "document": 0}
    original = encoding._run_batches

    def counting(retriever, texts, kind, *args, **kwargs):
        counts[kind] += len(texts)
        return original(retriever, texts, kind, *args, **kwargs)

    encoding._run_batches = counting
    return counts


def adapt(collection: BeirCollection, side: str, output: Path, cache: EmbeddingCache, epochs: int) -> dict:
    """Train a 6-expert SB-MoE head on ``side`` and evaluate it as a deployment would; timed."""
    model_config, train_config = build_configs(
        "default",
        {"backbone": "all-MiniLM-L6-v2", "num_experts": 6, "head_side": side, "max_doc_length": 256},
        {"epochs": epochs, "batch_size": 64, "head_only": True, "checkpoint_selection": "last"},
    )
    queries = {q: collection.queries[q] for q in sorted(collection.split_qrels("test"))}
    started = time.perf_counter()
    train(
        model_config, train_config, collection, output / "model", JobOptions(show_progress=False, cache=cache)
    )
    trained = time.perf_counter() - started
    model = Retriever.load(str(output / "model"))
    if side == "query":
        index = open_index(output / "backbone-index", model.index_fingerprints())  # built before the clock
    else:
        documents = {d: doc.full_text for d, doc in collection.corpus.items()}
        index = build_index(model, documents, encode=ENCODE)  # from the texts: re-indexing
    indexed = time.perf_counter() - started - trained
    run = search(
        model, index, queries, SearchConfig(top_k=10), ENCODE, JobOptions(show_progress=False, cache=cache)
    )
    ndcg = evaluate_run(collection.split_qrels("test"), run, metrics=("ndcg@10",)).metrics["ndcg@10"]
    return {"train": trained, "index": indexed, "total": time.perf_counter() - started, "ndcg@10": ndcg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10, help="head-only training epochs (both sides)")
    parser.add_argument(
        "--max-docs", type=int, default=None, help="keep the judged documents and others up to this many"
    )
    args = parser.parse_args()
    collection = scifact()
    if args.max_docs:
        judged = {d for split in collection.qrels.values() for docs in split.values() for d in docs}
        others = [d for d in collection.corpus if d not in judged][: max(args.max_docs - len(judged), 0)]
        collection.corpus = {d: doc for d, doc in collection.corpus.items() if d in judged or d in others}
    print(f"machine: {machine()}")
    print(f"SciFact: {len(collection.corpus)} documents, {len(collection.split_qrels('test'))} test queries")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        cache = EmbeddingCache(root / "cache")
        backbone = Retriever.load("all-MiniLM-L6-v2")
        started = time.perf_counter()
        documents = {d: doc.full_text for d, doc in collection.corpus.items()}
        build_index(backbone, documents, encode=ENCODE, cache=cache).save(root / "query" / "backbone-index")
        queries = list(collection.queries.values())
        encode_pooled(
            backbone, queries, "query", ENCODE, options=JobOptions(show_progress=False, cache=cache)
        )
        seconds = time.perf_counter() - started
        print(f"deployed state (not timed below): backbone index and cached embeddings in {seconds:.0f} s")
        counts = count_backbone_texts()
        rows = {}
        for side in ("query", "both"):
            before = dict(counts)
            rows[side] = adapt(collection, side, root / side, cache, args.epochs)
            rows[side]["documents"] = counts["document"] - before["document"]
    print("\n| head side | train s | re-index s | train + index + evaluate s | documents encoded | nDCG@10 |")
    print("|---|---:|---:|---:|---:|---:|")
    for side, row in rows.items():
        print(
            f"| {side} | {row['train']:.1f} | {row['index']:.1f} | {row['total']:.1f} | "
            f"{row['documents']:,} | {row['ndcg@10']:.4f} |"
        )
    print(f"\nadapting on the query side is {rows['both']['total'] / rows['query']['total']:.1f}x faster")


if __name__ == "__main__":
    main()
