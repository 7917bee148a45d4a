"""Corpus encoding: every sbmoe backend and precision against sentence-transformers' ``encode``, same run.

Encodes the SciFact corpus with all-MiniLM-L6-v2 at max length 256: sentence-transformers' ``encode``
with its defaults (float32, batch 32) and sbmoe with each setting this CPU runs (torch fp32, torch
bf16 where the CPU has fast bf16, ONNX Runtime fp32 and int8), all at batch 32 unless
``--batch-size``, settings interleaved. Prints the CPU class, passages/s (median of ``--repeats``),
the ratio to sentence-transformers, and nDCG@10 on SciFact test and (``--nfcorpus``) NFCorpus test
with its difference to float32, and which setting ``--backend auto`` picks here.

    .venv/bin/python bench/bench_encode.py [--repeats 1] [--nfcorpus]
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np
from common import machine, median_seconds, scifact
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig
from sbmoe.core.runtime import cpu_has_fast_bf16, onnxruntime_available, resolve_inference
from sbmoe.evaluation.metrics import evaluate_run
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.backbones import resolve_backbone
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.index import DenseIndex

MODEL = "all-MiniLM-L6-v2"
MAX_LENGTH = 256


def ndcg10(encode, collection) -> float:
    """nDCG@10 on the collection's test split, queries and documents encoded by ``encode``."""
    doc_ids = list(collection.corpus)
    documents = encode([collection.corpus[d].full_text for d in doc_ids], "document")
    return ndcg10_of(documents, encode, collection)


def ndcg10_of(documents: np.ndarray, encode, collection) -> float:
    qrels = collection.split_qrels("test")
    query_ids = sorted(q for q in qrels if q in collection.queries)
    queries = np.asarray(encode([collection.queries[q] for q in query_ids], "query"))
    run = DenseIndex(documents, list(collection.corpus), "bench").search(queries, 100, query_ids=query_ids)
    return evaluate_run(qrels, run, metrics=("ndcg@10",)).metrics["ndcg@10"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="sbmoe's batch size")
    parser.add_argument("--repeats", type=int, default=1, help="timed encodings per setting (median)")
    parser.add_argument("--nfcorpus", action="store_true", help="also score every setting on NFCorpus")
    args = parser.parse_args()

    collection = scifact()
    documents = [collection.corpus[d].full_text for d in collection.corpus]
    print(f"machine: {machine()}")
    print(
        f"SciFact: {len(documents)} passages; {MODEL}, max length {MAX_LENGTH}, "
        f"sbmoe batch {args.batch_size}, median of {args.repeats}"
    )

    reference = SentenceTransformer(resolve_backbone(MODEL), device="cpu")
    reference.max_seq_length = MAX_LENGTH
    retriever = Retriever.load(MODEL)
    assert retriever.max_length("document") == MAX_LENGTH
    auto = resolve_inference("auto", "auto", retriever.device)
    print(f"--backend auto picks here: {auto.backend} {auto.precision} ({auto.reason})")

    def with_st(texts, kind):
        return reference.encode(texts, convert_to_numpy=True)

    def with_sbmoe(backend, precision):
        config = EncodeConfig(encode_batch_size=args.batch_size, backend=backend, precision=precision)
        return lambda texts, kind: encode_texts(retriever, texts, kind, config)

    settings = {
        "sentence-transformers encode (fp32)": with_st,
        "sbmoe torch fp32": with_sbmoe("torch", "fp32"),
    }
    if cpu_has_fast_bf16():
        settings["sbmoe torch bf16"] = with_sbmoe("torch", "bf16")
    if onnxruntime_available():
        settings["sbmoe onnx fp32"] = with_sbmoe("onnx", "fp32")
        settings["sbmoe onnx int8"] = with_sbmoe("onnx", "int8")
    for encode in settings.values():
        encode(documents[:64], "document")  # warm-up (and the one-time ONNX export)
    timings: dict[str, list[float]] = {name: [] for name in settings}
    doc_embeddings: dict[str, np.ndarray] = {}
    for _ in range(args.repeats):  # settings interleaved, so load changes hit all of them alike
        for name, encode in settings.items():
            seconds, doc_embeddings[name] = median_seconds(lambda e=encode: e(documents, "document"), 1)
            timings[name].append(seconds)
    nfcorpus = scifact("nfcorpus") if args.nfcorpus else None
    results = {}
    for name, encode in settings.items():
        seconds = statistics.median(timings[name])
        results[name] = {
            "seconds": round(seconds, 1),
            "passages_per_s": round(len(documents) / seconds, 1),
            "scifact_ndcg@10": round(ndcg10_of(doc_embeddings[name], encode, collection), 4),
        }
        if nfcorpus is not None:
            results[name]["nfcorpus_ndcg@10"] = round(ndcg10(encode, nfcorpus), 4)
        print(f"  {name}: {results[name]}", flush=True)

    base = results["sentence-transformers encode (fp32)"]["passages_per_s"]
    fp32 = results["sbmoe torch fp32"]
    collections = ["scifact"] + (["nfcorpus"] if nfcorpus is not None else [])
    header = " | ".join(f"{c} nDCG@10 | vs fp32" for c in collections)
    print(f"\n| setting | passages/s | ratio to sentence-transformers | {header} |")
    print("|---|---:|---:|" + "---:|---:|" * len(collections))
    for name, row in results.items():
        ratio = row["passages_per_s"] / base
        cells = " | ".join(
            f"{row[f'{c}_ndcg@10']:.4f} | {row[f'{c}_ndcg@10'] - fp32[f'{c}_ndcg@10']:+.4f}"
            for c in collections
        )
        print(f"| {name} | {row['passages_per_s']} | {ratio:.2f}x | {cells} |")
    print("\ntargets: AVX2-only >= 2.0x, nDCG@10 within 0.005 of fp32; AMX bf16 >= 2.5x, within 0.003")
    print(json.dumps({"machine": machine(), "auto": auto.key, "results": results}))


if __name__ == "__main__":
    main()
