"""Corpus encoding: sbmoe (fp32 and bf16) against sentence-transformers' ``encode``, same run.

Encodes the SciFact corpus with all-MiniLM-L6-v2 at max length 256 three ways: sentence-transformers'
``encode`` with its defaults (float32, batch 32), sbmoe in float32 and sbmoe in bf16 (what
``--precision auto`` picks on CPUs with AMX), both at the same batch of 32 unless ``--batch-size``.
Prints passages/s (median of ``--repeats``), the ratio to sentence-transformers and nDCG@10 on
SciFact test for each.

    .venv/bin/python bench/bench_encode.py [--repeats 1]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from common import machine, median_seconds, scifact
from sentence_transformers import SentenceTransformer

from sbmoe.config import EncodeConfig
from sbmoe.encoding import encode_texts
from sbmoe.evaluation import evaluate_run
from sbmoe.index import DenseIndex
from sbmoe.modeling import Retriever, resolve_backbone

MODEL = "all-MiniLM-L6-v2"
MAX_LENGTH = 256


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="sbmoe's batch size")
    parser.add_argument("--repeats", type=int, default=1, help="timed encodings per setting (median)")
    args = parser.parse_args()

    collection = scifact()
    doc_ids = list(collection.corpus)
    documents = [collection.corpus[d].full_text for d in doc_ids]
    qrels = collection.split_qrels("test")
    query_ids = sorted(qrels)
    queries = [collection.queries[q] for q in query_ids]
    print(f"machine: {machine()}")
    print(
        f"SciFact: {len(documents)} passages, {len(queries)} test queries; {MODEL}, max length {MAX_LENGTH}, "
        f"sbmoe batch {args.batch_size}, median of {args.repeats}"
    )

    reference = SentenceTransformer(resolve_backbone(MODEL), device="cpu")
    reference.max_seq_length = MAX_LENGTH
    retriever = Retriever.load(MODEL)
    assert retriever.max_length("document") == MAX_LENGTH

    def with_st(texts, kind):
        return reference.encode(texts, convert_to_numpy=True)

    def with_sbmoe(precision):
        config = EncodeConfig(encode_batch_size=args.batch_size, precision=precision)
        return lambda texts, kind: encode_texts(retriever, texts, kind, config)

    settings = {
        "sentence-transformers encode (fp32)": with_st,
        "sbmoe fp32": with_sbmoe("fp32"),
        "sbmoe bf16": with_sbmoe("bf16"),
    }
    for encode in settings.values():
        encode(documents[:64], "document")  # warm-up
    timings: dict[str, list[float]] = {name: [] for name in settings}
    doc_embeddings: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):  # settings interleaved, so load changes hit all of them alike
        for name, encode in settings.items():
            seconds, doc_embeddings[name] = median_seconds(lambda e=encode: e(documents, "document"), 1)
            timings[name].append(seconds)
    results = {}
    for name, encode in settings.items():
        query_embeddings = np.asarray(encode(queries, "query"))
        index = DenseIndex(doc_embeddings[name], doc_ids, "bench")
        run = index.search(query_embeddings, 100, query_ids=query_ids)
        ndcg = evaluate_run(qrels, run, metrics=("ndcg@10",)).metrics["ndcg@10"]
        seconds = statistics.median(timings[name])
        results[name] = {
            "seconds": round(seconds, 1),
            "passages_per_s": round(len(documents) / seconds, 1),
            "ndcg@10": round(ndcg, 4),
        }
        print(f"  {name}: {results[name]}", flush=True)

    base = results["sentence-transformers encode (fp32)"]["passages_per_s"]
    print("\n| setting | passages/s | ratio to sentence-transformers | nDCG@10 |\n|---|---:|---:|---:|")
    for name, row in results.items():
        ratio = row["passages_per_s"] / base
        print(f"| {name} | {row['passages_per_s']} | {ratio:.2f}x | {row['ndcg@10']:.4f} |")
    gap = results["sbmoe bf16"]["ndcg@10"] - results["sbmoe fp32"]["ndcg@10"]
    print(f"\nnDCG@10 bf16 minus fp32: {gap:+.4f} (target: within 0.003)")
    print("targets: sbmoe fp32 >= 1.0x, sbmoe bf16 >= 2.5x sentence-transformers")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
