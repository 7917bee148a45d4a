"""Corpus encoding: every sbmoe backend and precision against sentence-transformers' ``encode``, same run.

Encodes the SciFact corpus (or its first ``--passages``) with all-MiniLM-L6-v2 at max length 256:
sentence-transformers' ``encode`` with its defaults (float32, batch 32) and sbmoe with each setting
this CPU runs (``--backend auto``, as ``sbmoe index`` runs it; torch fp32; torch bf16 where the CPU
has fast bf16; ONNX Runtime fp32 and int8), all at batch 32 unless ``--batch-size``. The settings
are interleaved and their order rotates at each of the ``--repeats``, so load on the machine hits
all alike. Prints the CPU class, passages/s (median of the repeats, and the slowest and fastest),
the ratio to sentence-transformers, nDCG@10 on SciFact test and (``--nfcorpus``) NFCorpus test
with its difference to float32 (whole corpus only), and ``--backend auto``'s time stage by stage
(tokenise, backbone to pooled, head in float32, writing the index), medians of the repeats.

    .venv/bin/python bench/bench_encode.py [--repeats 3] [--passages 1024] [--nfcorpus]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
from common import machine, median_seconds, scifact
from sentence_transformers import SentenceTransformer

from sbmoe.config.jobs import EncodeConfig
from sbmoe.core.cpu import cpu_has_fast_bf16
from sbmoe.core.runtime import autocast, onnxruntime_available, resolve_inference
from sbmoe.evaluation.metrics import evaluate_run
from sbmoe.inference.encoding import apply_head_stages, encode_texts, encoder_runner, length_sorted_batches
from sbmoe.model.backbones import resolve_backbone
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex

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
    parser.add_argument("--repeats", type=int, default=3, help="timed encodings per setting (median)")
    parser.add_argument("--passages", type=int, help="encode the first N passages only (default: all)")
    parser.add_argument("--nfcorpus", action="store_true", help="also score every setting on NFCorpus")
    args = parser.parse_args()

    collection = scifact()
    documents = [collection.corpus[d].full_text for d in collection.corpus][: args.passages]
    whole = len(documents) == len(collection.corpus)
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
        f"sbmoe --backend auto ({auto.key})": with_sbmoe("auto", "auto"),
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
    stage_timings: list[dict[str, float]] = []
    doc_embeddings: dict[str, np.ndarray] = {}
    names = list(settings)
    for repeat in range(args.repeats):  # interleaved, the order rotating: load hits every setting alike
        for name in names[repeat % len(names) :] + names[: repeat % len(names)]:
            seconds, doc_embeddings[name] = median_seconds(
                lambda e=settings[name]: e(documents, "document"), 1
            )
            timings[name].append(seconds)
        stage_timings.append(auto_stages(retriever, documents, args.batch_size))
    nfcorpus = scifact("nfcorpus") if args.nfcorpus and whole else None
    results = {}
    for name, encode in settings.items():
        seconds = statistics.median(timings[name])
        results[name] = {
            "seconds": round(seconds, 1),
            "passages_per_s": round(len(documents) / seconds, 1),
            "slowest_fastest": [
                round(len(documents) / max(timings[name]), 1),
                round(len(documents) / min(timings[name]), 1),
            ],
        }
        if whole:
            results[name]["scifact_ndcg@10"] = round(ndcg10_of(doc_embeddings[name], encode, collection), 4)
        if nfcorpus is not None:
            results[name]["nfcorpus_ndcg@10"] = round(ndcg10(encode, nfcorpus), 4)
        print(f"  {name}: {results[name]}", flush=True)

    base = results["sentence-transformers encode (fp32)"]["passages_per_s"]
    fp32 = results["sbmoe torch fp32"]
    collections = (["scifact"] if whole else []) + (["nfcorpus"] if nfcorpus is not None else [])
    header = "".join(f" {c} nDCG@10 | vs fp32 |" for c in collections)
    print(f"\n| setting | passages/s (median) | slowest - fastest | ratio to sentence-transformers |{header}")
    print("|---|---:|---:|---:|" + "---:|---:|" * len(collections))
    for name, row in results.items():
        slowest, fastest = row["slowest_fastest"]
        cells = "".join(
            f" {row[f'{c}_ndcg@10']:.4f} | {row[f'{c}_ndcg@10'] - fp32[f'{c}_ndcg@10']:+.4f} |"
            for c in collections
        )
        ratio = row["passages_per_s"] / base
        print(f"| {name} | {row['passages_per_s']} | {slowest} - {fastest} | {ratio:.2f}x |{cells}")
    stages = {stage: statistics.median(t[stage] for t in stage_timings) for stage in stage_timings[0]}
    print(f"\n`--backend auto` ({auto.key}) stage by stage, seconds (median of {args.repeats}):")
    print("| " + " | ".join(stages) + " |\n|" + "---:|" * len(stages))
    print("| " + " | ".join(f"{seconds:.2f}" for seconds in stages.values()) + " |")
    print("\ntargets: AVX2-only >= 1.4x, nDCG@10 within 0.005 of fp32; bf16 units >= 2.5x, within 0.003")
    print(json.dumps({"machine": machine(), "auto": auto.key, "results": results, "auto_stages": stages}))


def auto_stages(retriever: Retriever, documents: list[str], batch_size: int) -> dict[str, float]:
    """Seconds of each stage of ``--backend auto``'s corpus encoding, run one stage after another."""
    config = EncodeConfig(encode_batch_size=batch_size)
    runner = encoder_runner(retriever, config)
    plan = resolve_inference("auto", "auto", retriever.device)
    seconds = {}
    started = time.perf_counter()
    batches = list(length_sorted_batches(retriever, documents, "document", batch_size))
    seconds["tokenise"] = time.perf_counter() - started
    started = time.perf_counter()
    pooled = np.zeros((len(documents), retriever.model.get_embedding_dimension()), dtype=np.float32)
    with torch.inference_mode(), autocast(plan.precision, retriever.device):
        for positions, batch in batches:
            pooled[positions] = runner(batch)["sentence_embedding"].float().numpy()
    seconds["backbone to pooled"] = time.perf_counter() - started
    started = time.perf_counter()
    embeddings = apply_head_stages(retriever, pooled, "document")
    seconds["head (float32)"] = time.perf_counter() - started
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        DenseIndex(embeddings, [str(n) for n in range(len(documents))], "bench").save(scratch)
    seconds["writing the index"] = time.perf_counter() - started
    return seconds


if __name__ == "__main__":
    main()
