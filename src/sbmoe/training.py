"""The training loop: in-batch contrastive fine-tuning with dev-based model selection and resume.

Layout of an output directory::

    DIR/                    the final model (sentence-transformers format + sbmoe.json)
    DIR/training/
        config.json         model and training configs, data, command, versions
        log.jsonl           one line per step / evaluation
        checkpoint/         latest state for resuming (model, optimiser, scheduler, RNG, position)
        best/               best model so far on dev nDCG@10 (or the last, by configuration)
        done.json           written when training finished; summary of the run

Everything under ``training/`` is written atomically, so an interrupted run resumes from its last
checkpoint.

Distributed data parallelism (``torchrun``, one process per device): every step takes one global
batch of ``batch_size * world_size`` pairs from ``batch_order``; each process encodes its contiguous
slice, scores its queries against the documents of all processes (gathered with their gradients),
and the gradients are averaged, so the update equals one process's step on the whole global batch.
Only rank 0 writes files; it reads the checkpoint too and hands its state to the other processes,
so nodes need not share a disk.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from sbmoe import __version__
from sbmoe.batching import (
    BatchOrder,
    false_negative_mask,
    length_grouped_batches,
    pick_negatives,
    shuffled_batches,
)
from sbmoe.cache import EmbeddingCache
from sbmoe.config import ModelConfig, TrainConfig
from sbmoe.data import BeirCollection, positive_pairs, train_dev_split
from sbmoe.dev_evaluation import DevEvaluator
from sbmoe.distributed import (
    DistributedContext,
    all_gather_tensor,
    all_gather_with_grad,
    average_gradients,
    broadcast_module,
    init_distributed,
    shard_bounds,
    split_sizes,
)
from sbmoe.encoding import run_stages, tokenize
from sbmoe.errors import UsageError
from sbmoe.gradient_cache import GradientCache
from sbmoe.head_only import PooledTexts
from sbmoe.io import atomic_directory, read_json, write_json
from sbmoe.losses import in_batch_contrastive_loss, load_balancing_loss, router_z_loss
from sbmoe.modeling import Retriever
from sbmoe.negatives import load_negatives, mine_bm25_negatives, mine_dense_negatives, save_negatives
from sbmoe.routing import RoutingTracker
from sbmoe.runtime import autocast, resolve_precision, seed_everything

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a finished training run reports."""

    output_dir: Path
    steps: int
    best_step: int
    best_dev_ndcg10: float | None
    dev_history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    resumed_from_step: int | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["output_dir"] = str(self.output_dir)
        return data


def learning_rate_lambda(config: TrainConfig, total_steps: int) -> Callable[[int], float]:
    """Multiplier of the base learning rates at a given step."""
    warmup = int(config.warmup_ratio * total_steps) if config.scheduler != "constant" else 0

    def factor(step: int) -> float:
        if config.scheduler == "constant":
            return 1.0
        if step < warmup:
            return (step + 1) / (warmup + 1)
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if config.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, 1.0 - progress)

    return factor


class Trainer:
    """Fine-tunes a :class:`Retriever` on a BEIR collection.

    Args:
        retriever: The model to train (its weights change in place).
        collection: Training data; pairs come from ``config.train_split`` qrels.
        config: Training settings.
        output_dir: Where the model and ``training/`` go.
        show_progress: Show progress bars (rank 0 only).
        batch_order: Batch sampler of global batches (defaults to a seeded shuffle of batches of
            ``batch_size * world_size`` pairs).
        rank: Process rank when no ``context`` is given; only rank 0 writes.
        command: The command line to record beside the outputs.
        cache: Pooled-embedding cache for dev evaluation (pays off where the backbone is
            unchanged: the starting model, or a final model that is evaluated again).
        context: The data-parallel job this process belongs to (from
            :func:`sbmoe.distributed.init_distributed`); ``None`` trains in this process alone.
            ``config.batch_size`` is per process: the global batch is ``batch_size * world_size``.
    """

    def __init__(
        self,
        retriever: Retriever,
        collection: BeirCollection,
        config: TrainConfig,
        output_dir: str | Path,
        show_progress: bool = True,
        batch_order: BatchOrder | None = None,
        rank: int = 0,
        command: Sequence[str] | None = None,
        cache: EmbeddingCache | None = None,
        context: DistributedContext | None = None,
    ) -> None:
        config.validate()
        self.context = context or DistributedContext(device=retriever.device)
        if self.context.device != retriever.device:
            raise UsageError(
                f"the model is on {retriever.device} but this process computes on {self.context.device}"
            )
        self.retriever = retriever
        self.collection = collection
        self.config = config
        self.output_dir = Path(output_dir)
        self.training_dir = self.output_dir / "training"
        self.batch_order = batch_order
        # ``rank`` (without a context) only decides who writes, as before contexts existed.
        self.is_main = self.context.is_main and rank == 0
        self.show_progress = show_progress and self.is_main
        self.global_batch_size = config.batch_size * self.context.world_size
        self.command = list(command) if command is not None else list(sys.argv)
        self.precision = resolve_precision(config.precision, retriever.device)

        self.train_qrels, self.dev_qrels = train_dev_split(
            collection, config.train_split, config.dev_split, config.dev_fraction, config.seed
        )
        self.pairs = positive_pairs(self.train_qrels)
        if len(self.pairs) < 2:
            raise UsageError(
                f"{collection.name}: fewer than 2 training pairs in split {config.train_split!r}"
            )
        if self.batch_order is None and config.length_grouped:
            lengths = [len(collection.corpus[d].full_text) for _, d in self.pairs]
            self.batch_order = length_grouped_batches(config.seed, self.global_batch_size, lengths)
        elif self.batch_order is None:
            self.batch_order = shuffled_batches(config.seed, self.global_batch_size)
        self.steps_per_epoch = len(self.batches(0))
        planned = self.steps_per_epoch * config.epochs
        self.total_steps = min(planned, config.max_steps) if config.max_steps else planned
        self.frozen_backbone = config.freeze_backbone or config.head_only
        if self.frozen_backbone and retriever.head is None:
            raise UsageError(
                "freeze_backbone/head_only train the MoE head only: the model needs --num-experts > 0"
            )
        if config.head_only and cache is None:
            cache = EmbeddingCache()  # pooled embeddings are the whole point: keep them for next time
        self.pooled = (
            PooledTexts(retriever, collection, cache, config, self.show_progress)
            if config.head_only
            else None
        )
        self.dev_evaluator = DevEvaluator(collection, self.dev_qrels, config, cache)

        backbone_params, head_params = retriever.parameter_groups()
        groups = [{"params": head_params, "lr": config.lr_head, "name": "head"}] if head_params else []
        if self.frozen_backbone:
            for parameter in backbone_params:
                parameter.requires_grad_(False)
        else:
            groups.insert(0, {"params": backbone_params, "lr": config.lr_backbone, "name": "backbone"})
        self.optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_lambda(config, self.total_steps)
        )
        self.step = 0
        self.best_score: float | None = None
        self.best_step = 0
        self.dev_history: list[dict[str, float]] = []
        self.routing = RoutingTracker()
        self.doc_pool = list(collection.corpus)
        self.negatives = self._prepare_negatives() if config.hard_negatives > 0 else None
        # Every process starts from rank 0's weights, however each one built its model.
        broadcast_module(retriever.model, self.context)

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches; under several processes, those too small to split are left out."""
        batches = self.batch_order(epoch, len(self.pairs))
        if self.context.is_distributed:
            batches = [batch for batch in batches if len(batch) >= self.context.world_size]
        return batches

    # ------------------------------------------------------------------------------------- state
    def run_config(self) -> dict[str, Any]:
        """Everything that determines this run, saved beside it and compared on resume."""
        return {
            "model_config": dataclasses.asdict(self.retriever.config),
            "train_config": dataclasses.asdict(self.config),
            "data": {"name": self.collection.name, "root": str(self.collection.root)},
            "world_size": self.context.world_size,
        }

    def _check_resumable(self) -> dict[str, Any] | None:
        """The saved checkpoint state if this output dir holds one from the same configuration."""
        state_file = self.training_dir / "checkpoint" / "state.json"
        if not state_file.exists():
            return None
        saved = read_json(self.training_dir / "config.json")
        mine = self.run_config()
        if {k: saved.get(k) for k in ("model_config", "train_config")} != {
            k: mine[k] for k in ("model_config", "train_config")
        }:
            raise UsageError(
                f"{self.output_dir} holds a checkpoint of a different configuration; choose another "
                f"--output or delete {self.training_dir} to start over"
            )
        if saved.get("world_size", 1) != mine["world_size"]:
            raise UsageError(
                f"{self.output_dir} holds a checkpoint of a run on {saved.get('world_size', 1)} "
                f"process(es), this one has {mine['world_size']}: the global batch would change. Resume "
                f"with the same number of processes, or choose another --output"
            )
        return read_json(state_file)

    def _rng_state(self) -> dict[str, Any]:
        state = {
            "torch_rng": torch.get_rng_state(),
            "numpy_rng": np.random.get_state(),
            "python_rng": random.getstate(),
        }
        if self.retriever.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.retriever.device).cpu()
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        if "cuda_rng" in state and self.retriever.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.retriever.device)

    def _save_checkpoint(self, epoch: int, batch_index: int) -> None:
        # Each process's random state (dropout, gate noise) goes into rank 0's checkpoint.
        rank_rng = self.context.all_gather_object(self._rng_state()) if self.context.is_distributed else None
        if not self.is_main:
            return
        with atomic_directory(self.training_dir / "checkpoint") as tmp:
            state = {k: v.detach().cpu().contiguous() for k, v in self.retriever.model.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"))
            extra = {
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                **self._rng_state(),
            }
            if rank_rng is not None:
                extra["rank_rng"] = rank_rng
            torch.save(extra, tmp / "optimizer.pt")
            write_json(
                tmp / "state.json",
                {
                    "step": self.step,
                    "epoch": epoch,
                    "batch_index": batch_index,
                    "best_score": self.best_score,
                    "best_step": self.best_step,
                    "dev_history": self.dev_history,
                },
            )

    def _load_checkpoint(self, state: dict[str, Any]) -> tuple[int, int]:
        """Restore the checkpoint (read by rank 0, handed to the other processes)."""
        directory = self.training_dir / "checkpoint"

        def read() -> dict[str, Any]:
            self.retriever.model.load_state_dict(load_file(str(directory / "model.safetensors")))
            return torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=False)

        extra = self.context.run_on_main(read)
        broadcast_module(self.retriever.model, self.context)
        self.optimizer.load_state_dict(extra["optimizer"])
        self.scheduler.load_state_dict(extra["scheduler"])
        rank_rng = extra.get("rank_rng")
        if rank_rng is not None and len(rank_rng) == self.context.world_size:
            self._set_rng_state(rank_rng[self.context.rank])
        else:
            self._set_rng_state(extra)
        self.step = state["step"]
        self.best_score = state["best_score"]
        self.best_step = state["best_step"]
        self.dev_history = state["dev_history"]
        return state["epoch"], state["batch_index"]

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.training_dir.mkdir(parents=True, exist_ok=True)
        with open(self.training_dir / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------------------------------- steps
    def training_step(self, batch: Sequence[int]) -> dict[str, float]:
        """One optimiser step on the (global) batch of pairs at ``batch``; returns the loss terms.

        Under several processes each one encodes its contiguous slice of ``batch``; document
        embeddings and router logits are gathered from all of them (with gradients), every process
        scores its own queries against all documents, and the losses are scaled so that averaging
        the gradients over processes gives exactly the gradient of the whole batch's loss.
        """
        context = self.context
        sizes = split_sizes(len(batch), context.world_size)
        start, stop = shard_bounds(len(batch), context.rank, context.world_size)
        local = batch[start:stop]
        query_ids = [self.pairs[i][0] for i in local]
        doc_ids = [self.pairs[i][1] for i in local]
        model = self.retriever.model
        model.train()
        if self.frozen_backbone:
            for stage in self.retriever.encoder_stages():
                stage.eval()  # frozen means no dropout either
        # Each process's documents: its positives, then its queries' hard negatives (if any).
        per_rank_docs = []
        for rank in range(context.world_size):
            first, last = shard_bounds(len(batch), rank, context.world_size)
            positives = [self.pairs[i][1] for i in batch[first:last]]
            queries_of_rank = [self.pairs[i][0] for i in batch[first:last]]
            per_rank_docs.append(positives + self._hard_negatives(queries_of_rank))
        local_docs = per_rank_docs[context.rank]
        chunk_size = self.config.grad_cache_chunk_size
        gradient_cache = GradientCache(self._embed, chunk_size, self.retriever.device) if chunk_size else None
        embed = gradient_cache.embed if gradient_cache else self._embed
        query_out = embed(query_ids, "query")
        doc_out = embed(local_docs, "document")
        if self.retriever.head is not None:
            self.routing.add("queries", query_out)
            self.routing.add("documents", doc_out)
        doc_sizes = [len(docs) for docs in per_rank_docs]
        documents = all_gather_with_grad(doc_out["sentence_embedding"].float(), doc_sizes, context)
        all_doc_ids = [doc for docs in per_rank_docs for doc in docs]
        mask = (
            false_negative_mask(query_ids, all_doc_ids, self.train_qrels).to(documents.device)
            if self.config.mask_false_negatives
            else None
        )
        offset = sum(doc_sizes[: context.rank])
        labels = torch.arange(offset, offset + len(local), device=documents.device)
        contrastive = in_batch_contrastive_loss(
            query_out["sentence_embedding"].float(),
            documents,
            self.config.temperature,
            labels=labels,
            false_negative_mask=mask,
        )
        if self.config.symmetric_loss:
            # document -> query: each local document against every query of the batch.
            queries = all_gather_with_grad(query_out["sentence_embedding"].float(), sizes, context)
            all_query_ids = [self.pairs[i][0] for i in batch]
            reverse_mask = (
                false_negative_mask(all_query_ids, doc_ids, self.train_qrels).T.to(queries.device)
                if self.config.mask_false_negatives
                else None
            )
            reverse = in_batch_contrastive_loss(
                doc_out["sentence_embedding"][: len(local)].float(),  # positives only
                queries,
                self.config.temperature,
                labels=labels,
                false_negative_mask=reverse_mask,
            )
            contrastive = (contrastive + reverse) / 2
        # This process's share of the batch mean: the gradient average over processes then equals
        # the gradient of the mean over the whole batch, whatever the slice sizes.
        contrastive = contrastive * (len(local) * context.world_size / len(batch))
        loss = contrastive
        terms = {"contrastive": contrastive.item()}
        head = self.retriever.head
        if head is not None and head.gating == "learned":
            # Router statistics are batch means: computed on the whole batch on every process.
            router_sizes = [size + docs for size, docs in zip(sizes, doc_sizes, strict=True)]
            logits = all_gather_with_grad(
                torch.cat([query_out["router_logits"], doc_out["router_logits"]]).float(),
                router_sizes,
                context,
            )
            chosen = all_gather_tensor(
                torch.cat([query_out["expert_index"], doc_out["expert_index"]]), router_sizes, context
            )
            if self.config.load_balancing_coef > 0:
                balance = load_balancing_loss(logits, chosen)
                loss = loss + self.config.load_balancing_coef * balance
                terms["load_balancing"] = balance.item()
            if self.config.router_z_loss_coef > 0:
                z_loss = router_z_loss(logits)
                loss = loss + self.config.router_z_loss_coef * z_loss
                terms["router_z"] = z_loss.item()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if gradient_cache:
            gradient_cache.backward()
        average_gradients(model.parameters(), context)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        terms["loss"] = loss.item()
        if context.is_distributed:
            # The whole batch's values: the contrastive shares add up; router terms are the same
            # on every process.
            total = context.all_reduce_sum([terms["contrastive"], terms["loss"]])
            terms["contrastive"], terms["loss"] = (value / context.world_size for value in total)
        return terms

    def _log_routing(self, epoch: int) -> None:
        """Log the epoch's expert usage (training selections) and warn when one expert takes over."""
        summary = self.routing.summary()
        self.routing = RoutingTracker()
        if not summary:
            return
        self._log({"step": self.step, "epoch": epoch, "event": "routing", **summary})
        for kind in ("queries", "documents"):
            share = max(summary[f"usage_{kind}"])
            if share > self.config.collapse_threshold:
                expert = summary[f"usage_{kind}"].index(share)
                warnings.warn(
                    f"expert collapse: expert {expert} took {share:.0%} of the {kind} in epoch {epoch} "
                    f"(threshold {self.config.collapse_threshold:.0%}); consider load balancing "
                    "(--load-balancing-coef) or expert dropout",
                    RuntimeWarning,
                    stacklevel=2,
                )

    def _hard_negatives(self, query_ids: Sequence[str]) -> list[str]:
        """``hard_negatives`` mined negatives per query, rotating with the step (empty when off)."""
        if self.negatives is None:
            return []
        return [
            doc
            for query_id in query_ids
            for doc in pick_negatives(
                self.negatives,
                query_id,
                self.config.hard_negatives,
                self.config.seed,
                self.step,
                self.doc_pool,
                self.train_qrels,
            )
        ]

    def _prepare_negatives(self) -> dict[str, list[str]]:
        """Mine (rank 0, once; kept in training/negatives.json for resumes) or read hard negatives."""
        saved = self.training_dir / "negatives.json"
        source = self.config.negatives_source

        def mine() -> dict[str, list[str]]:
            if saved.exists():
                return load_negatives(saved)
            depth, per_query = self.config.negatives_depth, max(10, self.config.hard_negatives)
            if source == "bm25":
                mined = mine_bm25_negatives(self.collection, self.train_qrels, per_query, depth)
            elif source == "dense":
                mined = mine_dense_negatives(
                    self.retriever,
                    self.collection,
                    self.train_qrels,
                    per_query,
                    depth,
                    batch_size=self.config.encode_batch_size,
                    precision=self.config.precision,
                    show_progress=self.show_progress,
                )
            else:
                mined = load_negatives(source)
            save_negatives(mined, saved)
            return mined

        return self.context.run_on_main(mine)

    def _embed(self, ids: Sequence[str], kind: str) -> dict[str, Any]:
        """Run the model on the queries or documents ``ids`` (from cached pooled embeddings if head-only)."""
        with autocast(self.precision, self.retriever.device):
            return self._run_model(ids, kind)

    def _run_model(self, ids: Sequence[str], kind: str) -> dict[str, Any]:
        if self.pooled is not None:
            return run_stages(
                self.retriever.head_stages(),
                {"sentence_embedding": self.pooled.lookup(kind, ids).to(self.retriever.device)},
            )
        if kind == "query":
            texts = [self.collection.queries[i] for i in ids]
        else:
            texts = [self.collection.corpus[i].full_text for i in ids]
        features = tokenize(self.retriever, texts, kind)
        if not self.frozen_backbone:
            return run_stages(self.retriever.model.children(), features)
        with torch.no_grad():
            features = run_stages(self.retriever.encoder_stages(), features)
        return run_stages(self.retriever.head_stages(), features)

    def evaluate_and_select(self, epoch: int) -> float:
        """Score dev nDCG@10; keep the model as best if it improves (or always, under ``last``)."""
        started = time.perf_counter()
        # Every process scores its slice of the corpus; all of them get the same score, so they
        # take the same decisions.
        score = self.dev_evaluator.ndcg10(self.retriever, self.show_progress, self.context)
        record = {"step": self.step, "epoch": epoch, "dev_ndcg@10": score}
        self.dev_history.append(record)
        improved = self.best_score is None or score > self.best_score
        if self.config.checkpoint_selection == "last" or improved:
            self.best_score, self.best_step = score, self.step
            if self.is_main:
                with atomic_directory(self.training_dir / "best") as tmp:
                    self.retriever.save(tmp, extra={"step": self.step, "dev_ndcg@10": score})
        self._log({**record, "event": "dev", "seconds": round(time.perf_counter() - started, 2)})
        logger.info("step %d: dev nDCG@10 = %.4f%s", self.step, score, " (best)" if improved else "")
        return score

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        """Run (or resume) training; returns the summary. The best model ends up in ``output_dir``."""
        done_file = self.training_dir / "done.json"
        summary = self.context.run_on_main(lambda: read_json(done_file) if done_file.exists() else None)
        if summary is not None:
            logger.info("%s is already trained; nothing to do", self.output_dir)
            return TrainResult(**{**summary, "output_dir": Path(summary["output_dir"])})
        started = time.perf_counter()
        # Rank 0 draws exactly what a single process would; the others get streams of their own
        # (dropout, gate noise). The batch order has its own generator, shared by all.
        seed_everything(self.config.seed + self.context.rank)
        state = self.context.run_on_main(self._check_resumable)
        start_epoch, start_batch = self._load_checkpoint(state) if state else (0, 0)
        resumed_from = self.step if state else None
        if self.is_main:
            write_json(
                self.training_dir / "config.json",
                {
                    **self.run_config(),
                    "command": self.command,
                    "sbmoe_version": __version__,
                    "torch_version": torch.__version__,
                    "precision": self.precision,
                },
            )
        if state is None and self.config.checkpoint_selection == "best":
            self.evaluate_and_select(epoch=0)  # the starting model competes too

        bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not self.show_progress,
        )
        eval_steps = self.config.eval_steps
        checkpoint_steps = self.config.checkpoint_steps
        epoch = start_epoch
        try:
            while epoch < self.config.epochs and self.step < self.total_steps:
                batches = self.batches(epoch)
                first = start_batch if epoch == start_epoch else 0
                for batch_index in range(first, len(batches)):
                    terms = self.training_step(batches[batch_index])
                    self.step += 1
                    bar.update(1)
                    bar.set_postfix(loss=f"{terms['loss']:.4f}")
                    self._log(
                        {
                            "step": self.step,
                            "epoch": epoch,
                            "event": "train",
                            "lr": self.scheduler.get_last_lr(),
                            **terms,
                        }
                    )
                    if not math.isfinite(terms["loss"]):
                        raise FloatingPointError(f"loss became {terms['loss']} at step {self.step}")
                    finished = self.step >= self.total_steps
                    if eval_steps and self.step % eval_steps == 0 and not finished:
                        self.evaluate_and_select(epoch)
                    if checkpoint_steps and self.step % checkpoint_steps == 0 and not finished:
                        self._save_checkpoint(epoch, batch_index + 1)
                    if finished:
                        break
                epoch += 1
                self._log_routing(epoch)
                if not (eval_steps and self.step % eval_steps == 0) or self.step >= self.total_steps:
                    self.evaluate_and_select(epoch)
                self._save_checkpoint(epoch, 0)
        finally:
            bar.close()
        return self._finish(started, resumed_from)

    def _finish(self, started: float, resumed_from: int | None) -> TrainResult:
        result = TrainResult(
            output_dir=self.output_dir,
            steps=self.step,
            best_step=self.best_step,
            best_dev_ndcg10=self.best_score,
            dev_history=self.dev_history,
            seconds=round(time.perf_counter() - started, 2),
            resumed_from_step=resumed_from,
        )

        def save_best() -> None:
            if not self.is_main:
                return
            best = Retriever.load(str(self.training_dir / "best"), device="cpu")
            best.save(self.output_dir, extra={"training": result.to_dict()})
            self.retriever.model.load_state_dict(best.model.state_dict())
            write_json(self.training_dir / "done.json", result.to_dict())

        self.context.run_on_main(save_best)
        broadcast_module(self.retriever.model, self.context)  # every process ends with the kept model
        return result


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    collection: BeirCollection,
    output_dir: str | Path,
    show_progress: bool = True,
    command: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
    device: str | torch.device | None = "auto",
    context: DistributedContext | None = None,
) -> TrainResult:
    """Build a retriever from ``model_config`` and train it; the best model is saved in ``output_dir``.

    Launched by ``torchrun``, every process calls this: it joins the process group (unless
    ``context`` is given) and trains its share of each global batch of
    ``train_config.batch_size * world_size`` pairs; rank 0 writes the outputs.

    Args:
        device: ``auto`` (this process's GPU, else the CPU) or an explicit device; ignored when
            ``context`` is given.
        context: The data-parallel job (see :func:`sbmoe.distributed.init_distributed`).
    """
    context = context or init_distributed(device)
    seed_everything(train_config.seed)  # the head's initialisation depends on it
    retriever = Retriever.from_config(model_config, device=context.device)
    trainer = Trainer(
        retriever,
        collection,
        train_config,
        output_dir,
        show_progress,
        command=command,
        cache=cache,
        context=context,
    )
    return trainer.train()
