"""Search: one batched exact search against a per-query full sort (as the published code ranks).

Uses real all-MiniLM-L6-v2 embeddings of SciFact (pooled embeddings come from the embedding cache,
so only the first run encodes) and times top-100 retrieval for the 300 test queries.

    .venv/bin/python bench/bench_search.py [--repeats 5]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
from common import machine, median_seconds, scifact

from sbmoe.config.jobs import JobOptions
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import encode_texts
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.faiss.index import DenseIndex

TOP_K = 100


def per_query_full_sort(doc_embeddings, query_embeddings, doc_ids, query_ids):
    """Score one query at a time against the whole corpus and sort all of it."""
    run = {}
    for query_id, query in zip(query_ids, query_embeddings, strict=True):
        scores = doc_embeddings @ query
        order = np.argsort(-scores)[:TOP_K]
        run[query_id] = {doc_ids[i]: float(scores[i]) for i in order}
    return run


def per_query_torch_sort(doc_embeddings, query_embeddings, doc_ids, query_ids):
    """The published code's way: per query, torch scores, a full descending sort, the ranking as lists."""
    docs = torch.from_numpy(doc_embeddings)
    run = {}
    for query_id, query in zip(query_ids, torch.from_numpy(query_embeddings), strict=True):
        scores = docs @ query
        values, order = torch.sort(scores, descending=True)
        ranking = list(zip(order.tolist(), values.tolist(), strict=True))
        run[query_id] = {doc_ids[i]: score for i, score in ranking[:TOP_K]}
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    collection = scifact()
    retriever = Retriever.load("all-MiniLM-L6-v2")
    cache = EmbeddingCache()
    doc_ids = list(collection.corpus)
    query_ids = sorted(collection.split_qrels("test"))
    docs = encode_texts(
        retriever,
        [collection.corpus[d].full_text for d in doc_ids],
        "document",
        options=JobOptions(show_progress=False, cache=cache),
    )
    queries = encode_texts(
        retriever,
        [collection.queries[q] for q in query_ids],
        "query",
        options=JobOptions(show_progress=False, cache=cache),
    )
    print(f"machine: {machine()}")
    print(
        f"{len(query_ids)} queries x {len(doc_ids)} documents x {docs.shape[1]} dims, top {TOP_K}, "
        f"median of {args.repeats}"
    )

    index = DenseIndex(docs, doc_ids, "bench")
    batched, run = median_seconds(lambda: index.search(queries, TOP_K, query_ids=query_ids), args.repeats)
    looped, reference = median_seconds(
        lambda: per_query_full_sort(docs, queries, doc_ids, query_ids), args.repeats
    )
    published, published_run = median_seconds(
        lambda: per_query_torch_sort(docs, queries, doc_ids, query_ids), args.repeats
    )
    same = all(list(run[q])[:10] == list(reference[q])[:10] == list(published_run[q])[:10] for q in query_ids)
    print(f"batched exact search (sbmoe): {batched * 1000:.1f} ms")
    print(f"per-query numpy argsort:      {looped * 1000:.1f} ms  -> speed-up {looped / batched:.1f}x")
    print(f"per-query torch full sort:    {published * 1000:.1f} ms  -> speed-up {published / batched:.1f}x")
    print(f"(target >= 20x); same top-10 for every query: {same}")


if __name__ == "__main__":
    main()
