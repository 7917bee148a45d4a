"""Dev evaluation during training: nDCG@10 of held-out queries, for model selection."""

from __future__ import annotations

import random

from sbmoe.config.jobs import JobOptions, SearchConfig
from sbmoe.config.train import TrainConfig
from sbmoe.core.distributed import DistributedContext, shard_bounds
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.model.retriever import Retriever
from sbmoe.training.training_data import TrainingData, encode_config


class DevEvaluator:
    """Dev nDCG@10 on the held-out queries, over the whole corpus or a seeded sample of it.

    The sample keeps every dev positive and adds random other documents up to ``max_docs``, so
    the score is comparable between steps of one run (not with full-corpus test scores).

    Args:
        data: The training run's inputs: queries and corpus, the dev judgements, and under head-only
            training every text's pooled embedding (then only the head runs).
        config: ``dev_max_docs`` (size of the seeded corpus sample; ``None``: the whole corpus),
            ``seed`` (seeds the sample), and the batch size and precision of the encoding.
        cache: Pooled-embedding cache.
    """

    def __init__(self, data: TrainingData, config: TrainConfig, cache: EmbeddingCache | None = None) -> None:
        collection, dev_qrels, max_docs = data.collection, data.dev_qrels, config.dev_max_docs
        self.encode = encode_config(config)
        self.cache = cache
        self.pooled = data.pooled
        self.qrels = {q: rels for q, rels in dev_qrels.items() if q in collection.queries}
        self.query_ids = sorted(self.qrels)
        self.queries = {q: collection.queries[q] for q in self.query_ids}
        # Corpus (file) order, as evaluation uses: identical texts share pooled-embedding cache entries.
        doc_ids = list(collection.corpus)
        if max_docs is not None and max_docs < len(doc_ids):
            positives = sorted({d for rels in self.qrels.values() for d in rels if d in collection.corpus})
            others = sorted(set(doc_ids) - set(positives))
            rng = random.Random(config.seed)
            extra = max(0, max_docs - len(positives))
            chosen = set(positives) | set(rng.sample(others, min(extra, len(others))))
            doc_ids = [d for d in doc_ids if d in chosen]
        self.doc_ids = doc_ids
        self.documents = {d: collection.corpus[d].full_text for d in doc_ids}

    def ndcg10(
        self, retriever: Retriever, show_progress: bool = False, context: DistributedContext | None = None
    ) -> float:
        """Encode, search exactly, and score nDCG@10.

        Under several processes each one encodes and searches its contiguous slice of the corpus;
        the per-slice top-10s are merged (as a sharded index is searched), so every process gets
        the score of the whole corpus.
        """
        from sbmoe.core.runs import merge_runs
        from sbmoe.evaluation.metrics import evaluate_run
        from sbmoe.retrieval.search import search_documents, search_pooled

        context = context or DistributedContext(device=retriever.device)
        start, stop = shard_bounds(len(self.doc_ids), context.rank, context.world_size)
        run = {q: {} for q in self.query_ids}
        if stop > start and self.pooled is not None:
            doc_ids = self.doc_ids[start:stop]
            (run,) = search_pooled(
                retriever,
                (self.query_ids, self.pooled.array("query", self.query_ids)),
                (doc_ids, self.pooled.array("document", doc_ids)),
                SearchConfig(top_k=10),
            ).values()
        elif stop > start:
            documents = {d: self.documents[d] for d in self.doc_ids[start:stop]}
            (run,) = search_documents(
                retriever,
                self.queries,
                documents,
                SearchConfig(top_k=10),
                self.encode,
                JobOptions(show_progress=show_progress, cache=self.cache),
            ).values()
        if context.is_distributed:
            run = merge_runs(context.all_gather_object(run), 10)
        return evaluate_run(self.qrels, run, metrics=("ndcg@10",)).metrics["ndcg@10"]
