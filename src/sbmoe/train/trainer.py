"""The training loop: in-batch contrastive fine-tuning with dev-based model selection and resume.

Layout of an output directory::

    DIR/                    the final model (sentence-transformers format + sbmoe.json)
    DIR/training/
        config.json         model and training configs, data, command, versions
        log.jsonl           one line per step / evaluation
        checkpoint/         latest state for resuming (model, optimiser, scheduler, RNG, position)
        best/               best model so far on dev nDCG@10 (or the last, by configuration)
        done.json           written when training finished; summary of the run
        tensorboard/        event files, under report_to="tensorboard" (see sbmoe.train.run_log)

Everything under ``training/`` is written atomically, so an interrupted run resumes from its last
checkpoint.

Distributed data parallelism (``torchrun``, one process per device): every step takes one global
batch of ``batch_size * world_size`` pairs from ``batch_order``; each process encodes its contiguous
slice, the loss scores its queries against the documents of all processes (gathered with their
gradients), and DistributedDataParallel averages the gradients, so the update equals one process's
step on the whole global batch. Only rank 0 writes files; it reads the checkpoint too and hands its
state to the other processes, so nodes need not share a disk.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
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

from sbmoe.config.model import ModelConfig
from sbmoe.config.provenance import provenance
from sbmoe.config.train import TrainConfig
from sbmoe.core.artifacts import TRAINING_RUN, check_output, writing_output
from sbmoe.core.distributed import DistributedContext, broadcast_module, data_parallel, init_distributed
from sbmoe.core.errors import UsageError, first_line
from sbmoe.core.io import atomic_directory, read_json, write_json
from sbmoe.core.runtime import autocast, resolve_precision, seed_everything
from sbmoe.data.beir import BeirCollection
from sbmoe.data.training_files import TrainingFileCollection, training_collection
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.routing import RoutingTracker
from sbmoe.model.retriever import Retriever
from sbmoe.train.batching import BatchOrder, length_grouped_batches, shuffled_batches
from sbmoe.train.dev_evaluation import DevEvaluator
from sbmoe.train.gradient_cache import GradientCache
from sbmoe.train.losses import InBatchContrastiveLoss, RetrievalLoss, RouterLoss
from sbmoe.train.run_log import TENSORBOARD_DIR, TrainingReporter, startup_line, startup_record
from sbmoe.train.trainable import TrainableEncoder
from sbmoe.train.training_data import TrainingData, encode_config, prepare_training_data, require_head

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
    warning: str | None = None

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
    """Fine-tunes a :class:`Retriever` on prepared :class:`~sbmoe.train.training_data.TrainingData`.

    :func:`build_trainer` prepares the data and builds one; :func:`train` does everything.

    Args:
        retriever: The model to train (its weights change in place).
        data: Pairs, dev judgements, hard negatives, pooled texts (see
            :func:`~sbmoe.train.training_data.prepare_training_data`).
        config: Training settings.
        output_dir: Where the model and ``training/`` go.
        show_progress: Show progress bars (rank 0 only).
        batch_order: Batch sampler of global batches (defaults to a seeded shuffle of batches of
            ``batch_size * world_size`` pairs).
        command: The command line to record beside the outputs (default: ``sys.argv``).
        cache: Pooled-embedding cache for dev evaluation (pays off where the backbone is
            unchanged: the starting model, or a final model that is evaluated again).
        context: The data-parallel job this process belongs to (from
            :func:`sbmoe.core.distributed.init_distributed`); ``None`` trains in this process alone.
            ``config.batch_size`` is per process: the global batch is ``batch_size * world_size``.
    """

    def __init__(
        self,
        retriever: Retriever,
        data: TrainingData,
        config: TrainConfig,
        output_dir: str | Path,
        show_progress: bool = True,
        batch_order: BatchOrder | None = None,
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
        self.data = data
        self.config = config
        self.output_dir = Path(output_dir)
        self.training_dir = self.output_dir / "training"
        self.is_main = self.context.is_main
        self.show_progress = show_progress and self.is_main
        self.command = command
        self.precision = resolve_precision(config.precision, retriever.device)
        global_batch_size = config.batch_size * self.context.world_size
        if batch_order is None and config.length_grouped:
            batch_order = length_grouped_batches(config.seed, global_batch_size, data.document_lengths())
        self.batch_order = batch_order or shuffled_batches(config.seed, global_batch_size)
        self.steps_per_epoch = len(self.batches(0))
        # As in Hugging Face's Trainer, max_steps wins over epochs (more epochs run if it asks for them).
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        frozen_backbone = require_head(retriever, config)
        self.dev_evaluator = DevEvaluator(
            data.collection, data.dev_qrels, encode_config(config), config.dev_max_docs, config.seed, cache
        )
        self.optimizer = self._optimizer(frozen_backbone)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, learning_rate_lambda(config, self.total_steps)
        )
        router = RouterLoss.for_head(retriever.head, config, self.context)
        # DDP (under several processes) wraps the model after the backbone is frozen, so it ignores
        # frozen parameters; it also starts every process from rank 0's weights.
        encoder = TrainableEncoder(retriever, data, frozen_backbone, router_gradients=router is not None)
        self.model = data_parallel(encoder, self.context)
        self.loss = self._loss(router)
        self.step = 0
        self.best_score: float | None = None
        self.best_step = 0
        self.dev_history: list[dict[str, float]] = []
        self.routing = RoutingTracker()
        self.reporter = TrainingReporter()  # replaced for the run by train()
        self.setup: dict[str, Any] = {}  # the start-up record, kept for the model card

    def _optimizer(self, frozen_backbone: bool) -> torch.optim.Optimizer:
        """AdamW with one learning rate for the backbone and one for the head; a frozen backbone has none."""
        backbone_params, head_params = self.retriever.parameter_groups()
        groups = [{"params": head_params, "lr": self.config.lr_head, "name": "head"}] if head_params else []
        if frozen_backbone:
            for parameter in backbone_params:
                parameter.requires_grad_(False)
        else:
            groups.insert(0, {"params": backbone_params, "lr": self.config.lr_backbone, "name": "backbone"})
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    def _loss(self, router: RouterLoss | None) -> torch.nn.Module:
        """The one loss object a step calls: contrastive (+ router losses), gradient-cached if configured."""
        config, context = self.config, self.context
        qrels = self.data.train_qrels if config.mask_false_negatives else None
        contrastive = InBatchContrastiveLoss(config.temperature, qrels, config.symmetric_loss, context)
        loss = RetrievalLoss(self.model, contrastive, router, context)
        if config.grad_cache_chunk_size:
            return GradientCache(loss, config.grad_cache_chunk_size, self.retriever.device)
        return loss

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches; under several processes, those too small to split are left out."""
        batches = self.batch_order(epoch, len(self.data.pairs))
        if self.context.is_distributed:
            batches = [batch for batch in batches if len(batch) >= self.context.world_size]
        return batches

    # ------------------------------------------------------------------------------------- state
    def run_config(self) -> dict[str, Any]:
        """Everything that determines this run, saved beside it and compared on resume."""
        return {
            **run_settings(self.retriever.config, self.config, self.data.collection),
            "data": {"name": self.data.collection.name, "root": str(self.data.collection.root)},
            "world_size": self.context.world_size,
        }

    def _check_resumable(self) -> dict[str, Any] | None:
        """The saved checkpoint state if this output dir holds one from the same configuration."""
        check_output(
            self.output_dir,
            TRAINING_RUN,
            run_settings(self.retriever.config, self.config, self.data.collection),
        )
        state_file = self.training_dir / "checkpoint" / "state.json"
        if not state_file.exists():
            return None
        saved = read_json(self.training_dir / "config.json")
        mine = self.run_config()
        if saved.get("world_size", 1) != mine["world_size"]:
            raise UsageError(
                f"{self.output_dir} holds a checkpoint of a run on {saved.get('world_size', 1)} "
                f"process(es), this one has {mine['world_size']}: the global batch would change. Resume "
                f"with the same number of processes, or choose another --output"
            )
        return _read_checkpoint_file(state_file, read_json)

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
                    "log_bytes": self._log_size(),
                },
            )

    def _load_checkpoint(self, state: dict[str, Any]) -> tuple[int, int]:
        """Restore the checkpoint (read by rank 0, handed to the other processes)."""
        directory = self.training_dir / "checkpoint"

        def read() -> dict[str, Any]:
            weights = _read_checkpoint_file(directory / "model.safetensors", lambda p: load_file(str(p)))
            self.retriever.model.load_state_dict(weights)
            extra = _read_checkpoint_file(
                directory / "optimizer.pt", lambda p: torch.load(p, map_location="cpu", weights_only=False)
            )
            if "log_bytes" in state:  # the steps logged after the checkpoint are taken again: drop them
                with (
                    contextlib.suppress(FileNotFoundError),
                    open(self.training_dir / "log.jsonl", "r+b") as log,
                ):
                    log.truncate(state["log_bytes"])
            return extra

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

    def _log_size(self) -> int:
        try:
            return os.path.getsize(self.training_dir / "log.jsonl")
        except FileNotFoundError:
            return 0

    def _log(self, record: dict[str, Any]) -> None:
        if not self.is_main:
            return
        self.training_dir.mkdir(parents=True, exist_ok=True)
        with open(self.training_dir / "log.jsonl", "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        self.reporter.record(record)

    def _log_start(self, resumed_from: int | None) -> None:
        """Open the run's reporter; log and record what is about to be trained (rank 0)."""
        if not self.is_main:
            return
        self.reporter = TrainingReporter(
            self.config.report_to,
            self.training_dir / TENSORBOARD_DIR,
            [group["name"] for group in self.optimizer.param_groups],
            purge_step=resumed_from,
        )
        record = startup_record(
            self.retriever,
            self.data,
            self.config,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            world_size=self.context.world_size,
            precision=self.precision,
            dev_queries=len(self.dev_evaluator.query_ids),
            output_dir=self.output_dir,
            resumed_from=resumed_from,
        )
        logger.info(startup_line(record))
        self._log(record)
        self.setup = record

    # ------------------------------------------------------------------------------------- steps
    def training_step(self, positions: Sequence[int]) -> dict[str, float]:
        """One optimiser step on the global batch of pairs at ``positions``; returns the logged loss terms.

        Each process embeds its slice of the batch; the loss gathers what it needs from the other
        processes, and DDP averages the gradients, so the step is one process's on the whole batch.
        """
        batch = self.data.batch(positions, self.step, self.context.rank, self.context.world_size)
        self.model.train()
        with autocast(self.precision, self.retriever.device):
            output = self.loss(batch)
        output.loss.backward()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.retriever.head is not None:
            for kind, features in output.features.items():
                self.routing.add(kind, features)
        return output.terms

    def _log_routing(self, epoch: int) -> None:
        """Log the epoch's expert usage (training selections) and warn when one expert takes over."""
        summary = self.routing.summary()
        self.routing = RoutingTracker()
        if not summary:
            return
        self._log({"step": self.step, "epoch": epoch, "event": "routing", **summary})
        for kind in ("queries", "documents"):
            if f"usage_{kind}" not in summary:
                continue  # documents under a query-side head are not routed
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
        self._log_start(resumed_from)
        if self.is_main:
            write_json(
                self.training_dir / "config.json",
                {**self.run_config(), **provenance(self.command), "precision": self.precision},
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
            while self.step < self.total_steps:
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
        except BaseException:
            self.reporter.close()
            raise
        finally:
            bar.close()
        result = self._finish(started, resumed_from)
        self.reporter.close()  # after _finish, so its warning reaches TensorBoard too
        return result

    def _finish(self, started: float, resumed_from: int | None) -> TrainResult:
        warning = None
        if self.config.checkpoint_selection == "best" and self.best_step == 0 and self.step > 0:
            warning = (
                f"no trained checkpoint beat the starting model on dev nDCG@10 ({self.best_score:.4f}): "
                f"the saved model is the UNTRAINED start (best_step 0"
                + (", its MoE head at its random initialisation" if self.retriever.head is not None else "")
                + "); train longer, or keep the last checkpoint with --checkpoint-selection last"
            )
            logger.warning("%s: %s", self.output_dir, warning)
            self._log({"step": self.step, "event": "warning", "message": warning})
        result = TrainResult(
            output_dir=self.output_dir,
            steps=self.step,
            best_step=self.best_step,
            best_dev_ndcg10=self.best_score,
            dev_history=self.dev_history,
            seconds=round(time.perf_counter() - started, 2),
            resumed_from_step=resumed_from,
            warning=warning,
        )

        def save_best() -> None:
            if not self.is_main:
                return
            best = Retriever.load(str(self.training_dir / "best"), device="cpu")
            card_facts = {"train_config": dataclasses.asdict(self.config), "training_setup": self.setup}
            best.save(self.output_dir, extra={"training": result.to_dict(), **card_facts})
            self.retriever.model.load_state_dict(best.model.state_dict())
            write_json(self.training_dir / "done.json", result.to_dict())

        self.context.run_on_main(save_best)
        broadcast_module(self.retriever.model, self.context)  # every process ends with the kept model
        return result


def build_trainer(
    retriever: Retriever,
    collection: BeirCollection,
    config: TrainConfig,
    output_dir: str | Path,
    show_progress: bool = True,
    command: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
    context: DistributedContext | None = None,
    batch_order: BatchOrder | None = None,
) -> Trainer:
    """Prepare the training data of ``collection`` (mining negatives, pooling texts) and a trainer on it.

    Arguments as :class:`Trainer`'s; see :func:`~sbmoe.train.training_data.prepare_training_data`.
    """
    context = context or DistributedContext(device=retriever.device)
    # Before the expensive part (mining negatives, pooling texts): is output_dir ours to train into?
    context.run_on_main(
        lambda: check_output(output_dir, TRAINING_RUN, run_settings(retriever.config, config, collection))
    )
    if config.head_only and cache is None:
        cache = EmbeddingCache()  # pooled embeddings are the whole point: keep them for dev evaluation
    training_dir = Path(output_dir) / "training"
    progress = show_progress and context.is_main
    data = prepare_training_data(retriever, collection, config, training_dir, cache, context, progress)
    return Trainer(retriever, data, config, output_dir, show_progress, batch_order, command, cache, context)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    collection: BeirCollection | None,
    output_dir: str | Path,
    show_progress: bool = True,
    command: Sequence[str] | None = None,
    cache: EmbeddingCache | None = None,
    device: str | torch.device | None = "auto",
    context: DistributedContext | None = None,
    overwrite: bool = False,
) -> TrainResult:
    """Build a retriever from ``model_config`` and train it; the best model is saved in ``output_dir``.

    Launched by ``torchrun``, every process calls this: it joins the process group (unless
    ``context`` is given) and trains its share of each global batch of
    ``train_config.batch_size * world_size`` pairs; rank 0 writes the outputs.

    Args:
        collection: What to train on; ``None`` when ``train_config.train_file`` names a training file.
        device: ``auto`` (this process's GPU, else the CPU) or an explicit device; ignored when
            ``context`` is given.
        context: The data-parallel job (see :func:`sbmoe.core.distributed.init_distributed`).
        overwrite: Retrain into an ``output_dir`` that holds a training run of other settings (its
            ``training/`` folder is removed; the old model stays until the new one replaces it).

    Raises:
        UsageError: ``output_dir`` holds something else than a training run, a training run of
            other settings (without ``overwrite``), or another process is training into it; both or
            neither of ``collection`` and ``train_config.train_file`` are given.
        DataError: The training file is malformed.
    """
    context = context or init_distributed(device)
    train_config.validate()
    collection = training_collection(train_config, collection)
    if (
        isinstance(collection, TrainingFileCollection)
        and collection.negatives
        and train_config.file_negatives
        and train_config.hard_negatives == 0
    ):
        # A file that lists negatives is asking for them: one per query unless --hard-negatives.
        train_config = dataclasses.replace(train_config, hard_negatives=1)
        logger.info("%s lists negatives: 1 per query joins each batch", train_config.train_file)
    seed_everything(train_config.seed)  # the head's initialisation depends on it
    retriever = Retriever.from_config(model_config, device=context.device)
    settings = run_settings(retriever.config, train_config, collection)
    with contextlib.ExitStack() as held:
        # Rank 0 holds the output's lock for the whole run; a refusal there is raised everywhere.
        replacing = context.run_on_main(
            lambda: held.enter_context(
                writing_output(output_dir, TRAINING_RUN, settings, overwrite=overwrite)
            )
        )
        training_dir = Path(output_dir) / "training"
        if replacing and context.is_main:
            logger.warning("%s: --overwrite: replacing a training run of other settings", output_dir)
            shutil.rmtree(training_dir)
            training_dir.mkdir()
        trainer = build_trainer(
            retriever, collection, train_config, output_dir, show_progress, command, cache, context
        )
        return trainer.train()


def run_settings(
    model_config: ModelConfig, train_config: TrainConfig, collection: BeirCollection
) -> dict[str, Any]:
    """What makes two training runs the same (see :func:`sbmoe.core.artifacts.recorded_settings`).

    Where the run reports to (``report_to``) does not change it: a run may resume with TensorBoard on.
    """
    train_settings = dataclasses.asdict(train_config)
    del train_settings["report_to"]
    return {
        "model_config": dataclasses.asdict(model_config),
        "train_config": train_settings,
        "data": collection.name,
    }


def _read_checkpoint_file(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, with an unreadable (truncated, corrupt) checkpoint file named in a UsageError."""
    try:
        return read(path)
    except Exception as error:  # safetensors, torch and json each raise their own kinds
        raise UsageError(
            f"{path} is unreadable ({type(error).__name__}: {first_line(error)}): the checkpoint is "
            f"damaged; delete {path.parent} to train this run again from its start"
        ) from error
