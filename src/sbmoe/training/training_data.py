"""What training reads, prepared before the trainer exists: pairs, dev split, hard negatives, pooled texts."""

from __future__ import annotations

import functools
import random
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from sbmoe.config.jobs import EncodeConfig, JobOptions
from sbmoe.config.presets import QUERY_SIDE_TRAINS_ALONE
from sbmoe.config.train import TrainConfig
from sbmoe.core.distributed import DistributedContext, shard_bounds
from sbmoe.core.errors import DataWarning, UsageError
from sbmoe.core.layouts import TRAINING_FILES
from sbmoe.data.beir import BeirCollection, positive_pairs, train_dev_split
from sbmoe.data.training_files import TrainingFileCollection
from sbmoe.model.retriever import Retriever
from sbmoe.retrieval.stored_vectors import stored_document_vectors
from sbmoe.training.batching import TrainingBatch
from sbmoe.training.head_only import PooledTexts
from sbmoe.training.negatives import (
    Mining,
    Negatives,
    load_negatives,
    mine_bm25_negatives,
    mine_dense_negatives,
    save_negatives,
)

Qrels = dict[str, dict[str, int]]


@dataclass
class TrainingData:
    """The inputs of a training run.

    Attributes:
        collection: Texts of the queries and documents.
        train_qrels: Judgements the pairs come from (also the false-negative mask's).
        dev_qrels: Held-out judgements for model selection.
        pairs: (query id, positive doc id), the units a batch is drawn from.
        negatives: Mined hard negatives per query (``None``: no hard negatives).
        negatives_per_query: How many of them each query brings to a batch.
        seed: Seeds the rotation through each query's negatives.
        pooled: Pooled backbone embeddings of every text, for head-only training (else ``None``).
    """

    collection: BeirCollection
    train_qrels: Qrels
    dev_qrels: Qrels
    pairs: list[tuple[str, str]]
    negatives: Negatives | None = None
    negatives_per_query: int = 0
    seed: int = 0
    pooled: PooledTexts | None = None

    def texts(self, kind: str, ids: Sequence[str]) -> list[str]:
        """The texts of queries or documents ``ids`` (documents as "title text")."""
        if kind == "query":
            return [self.collection.queries[i] for i in ids]
        return [self.collection.corpus[i].full_text for i in ids]

    def document_lengths(self) -> list[int]:
        """Characters of each pair's document (for length-grouped batches)."""
        return [len(self.collection.corpus[doc].full_text) for _, doc in self.pairs]

    @functools.cached_property
    def _doc_pool(self) -> list[str]:
        return list(self.collection.corpus)

    def hard_negatives(self, query_ids: Sequence[str], step: int) -> list[str]:
        """``negatives_per_query`` mined negatives per query for ``step`` (empty when off)."""
        if self.negatives is None:
            return []
        return [doc for query_id in query_ids for doc in self.pick_negatives(query_id, step)]

    def pick_negatives(self, query_id: str, step: int) -> list[str]:
        """``negatives_per_query`` hard negatives of ``query_id`` for ``step``, rotating through its list.

        The choice depends only on (seed, step, query), so a resumed or distributed run picks the same
        ones. A query with too few mined negatives is topped up with random documents that are not
        relevant to it in ``train_qrels``.
        """
        mined = list((self.negatives or {}).get(query_id, ()))
        count = self.negatives_per_query
        rng = random.Random(zlib.crc32(f"{self.seed}:{step}:{query_id}".encode()))
        chosen = []
        if mined:
            start = rng.randrange(len(mined))
            chosen = [mined[(start + i) % len(mined)] for i in range(min(count, len(mined)))]
        relevant = self.train_qrels.get(query_id, {})
        while len(chosen) < count:
            doc = self._doc_pool[rng.randrange(len(self._doc_pool))]
            if relevant.get(doc, 0) <= 0 and doc not in chosen:
                chosen.append(doc)
        return chosen

    def batch(self, positions: Sequence[int], step: int, rank: int = 0, world_size: int = 1) -> TrainingBatch:
        """The pairs at ``positions``, cut into one contiguous slice per process, with hard negatives."""
        queries, documents = [], []
        for shard in range(world_size):
            first, last = shard_bounds(len(positions), shard, world_size)
            pairs = [self.pairs[i] for i in positions[first:last]]
            query_ids = [query for query, _ in pairs]
            queries.append(query_ids)
            documents.append([doc for _, doc in pairs] + self.hard_negatives(query_ids, step))
        return TrainingBatch(queries, documents, rank)


def encode_config(config: TrainConfig) -> EncodeConfig:
    """How training encodes texts outside the training step (dev evaluation, mining, pooling)."""
    return EncodeConfig(encode_batch_size=config.encode_batch_size, precision=config.precision)


def require_head(retriever: Retriever, config: TrainConfig) -> bool:
    """Whether the backbone is frozen; refuses a frozen backbone for a model without a head."""
    frozen = config.freeze_backbone or config.head_only
    if frozen and retriever.head_module is None:
        raise UsageError(
            "freeze_backbone/head_only train the head only: the model needs --num-experts > 0 "
            "or --head linear"
        )
    query_side = getattr(retriever.head_module, "head_side", "both") == "query"
    if not frozen and query_side:
        raise UsageError(f"{QUERY_SIDE_TRAINS_ALONE} (use --head-only or --freeze-backbone)")
    if config.document_index and not (config.head_only and query_side):
        raise UsageError(
            "document_index: documents are read from an index only when they are the backbone's own "
            "and training runs on pooled embeddings: a query-side head (--head-side query) with --head-only"
        )
    return frozen


def prepare_training_data(
    retriever: Retriever,
    collection: BeirCollection,
    config: TrainConfig,
    training_dir: Path,
    options: JobOptions | None = None,
    context: DistributedContext | None = None,
) -> TrainingData:
    """Split the judgements, list the pairs, mine (or read) hard negatives, pool texts for head-only.

    With ``config.document_index`` (a query-side head trained head-only), the documents' embeddings
    are read from that index of the backbone instead of encoded.

    Hard negatives are a training file's listed ones, or else mined once, by rank 0 (with the
    starting model when ``negatives_source`` is ``dense``); either way they are kept in
    ``training_dir/negatives.json``, so a resumed run reads the same ones.

    Args:
        retriever: The starting model (dense mining and head-only pooling use it).
        collection: The training collection.
        config: Training settings.
        training_dir: Where the run keeps its state (``negatives.json``).
        options: Progress bars, and the pooled-embedding cache of head-only pooling (default: neither).
        context: The data-parallel job (``None``: one process).
    """
    options = options or JobOptions(show_progress=False)
    config.validate()
    require_head(retriever, config)
    context = context or DistributedContext(device=retriever.device)
    train_qrels, dev_qrels = train_dev_split(
        collection, config.train_split, config.dev_split, config.dev_fraction, config.seed
    )
    pairs = positive_pairs(train_qrels)
    if len(pairs) < 2:
        raise UsageError(f"{collection.name}: fewer than 2 training pairs in split {config.train_split!r}")
    if config.max_train_pairs is not None and config.max_train_pairs < len(pairs):
        pairs = sorted(random.Random(config.seed).sample(pairs, config.max_train_pairs))
    stored_documents = (  # read (and checked) before any encoding or mining
        stored_document_vectors(
            config.document_index, list(collection.corpus), retriever.index_fingerprints()
        )
        if config.document_index
        else None
    )
    if context.is_main:
        split = f"{collection.name} {config.train_split}"
        retriever.warn_truncated([collection.queries[q] for q in train_qrels], "query", f"{split} queries")
        documents = sorted({doc for _, doc in pairs})
        retriever.warn_truncated(
            [collection.corpus[d].full_text for d in documents], "document", f"{split} positives"
        )
        if (
            isinstance(collection, TrainingFileCollection)
            and collection.negatives
            and not config.hard_negatives
        ):
            warnings.warn(
                f"{collection.root}: the negatives it lists are not used (--no-file-negatives); "
                "--hard-negatives K puts K of them per query in every batch",
                DataWarning,
                stacklevel=2,
            )
    negatives = None
    if config.hard_negatives > 0:
        negatives = context.run_on_main(
            lambda: _mine_negatives(
                retriever, collection, train_qrels, config, training_dir, options.show_progress
            )
        )
    pooled = None
    if config.head_only:
        encode, progress = encode_config(config), options.show_progress
        pooled = PooledTexts(retriever, collection, options.cache, encode, progress, stored_documents)
    return TrainingData(
        collection, train_qrels, dev_qrels, pairs, negatives, config.hard_negatives, config.seed, pooled
    )


def _mine_negatives(
    retriever: Retriever,
    collection: BeirCollection,
    train_qrels: Qrels,
    config: TrainConfig,
    training_dir: Path,
    show_progress: bool,
) -> Negatives:
    saved = training_dir / TRAINING_FILES.negatives
    if saved.exists():
        return load_negatives(saved)
    source = config.negatives_source
    mining = Mining(per_query=max(10, config.hard_negatives), depth=config.negatives_depth)
    if isinstance(collection, TrainingFileCollection) and collection.negatives:
        # The file's own negatives replace mining (queries without any are topped up at random).
        mined = {query: collection.negatives[query] for query in train_qrels if query in collection.negatives}
    elif source == "bm25":
        mined = mine_bm25_negatives(collection, train_qrels, mining)
    elif source == "dense":
        mined = mine_dense_negatives(
            retriever,
            collection,
            train_qrels,
            mining,
            encode_config(config),
            JobOptions(show_progress=show_progress),
        )
    else:
        mined = load_negatives(source)
    save_negatives(mined, saved)
    return mined
