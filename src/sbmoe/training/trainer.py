"""The training loop: in-batch contrastive fine-tuning with dev-based model selection and resume.

Layout of an output directory::

    DIR/                    the final model (sentence-transformers format + sbmoe.json)
    DIR/training/
        config.json         model and training configs, data, command, versions
        log.jsonl           one line per step / evaluation
        checkpoint/         latest state for resuming (model, optimiser, scheduler, RNG, position),
                            in safetensors and JSON: nothing pickled (see sbmoe.training.checkpoint)
        best/               best model so far on dev nDCG@10 (or the last, by configuration)
        done.json           written when training finished; summary of the run
        tensorboard/        event files, under report_to="tensorboard" (see sbmoe.training.run_log)

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
import logging
import math
import shutil
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from sbmoe.config.jobs import JobOptions
from sbmoe.config.model import ModelConfig
from sbmoe.config.provenance import provenance
from sbmoe.config.train import TrainConfig
from sbmoe.core.artifacts import TRAINING_RUN, check_output, writing_output
from sbmoe.core.distributed import DistributedContext, broadcast_module, data_parallel, init_distributed
from sbmoe.core.errors import TrainingDivergedError, UsageError
from sbmoe.core.io import read_json, write_json
from sbmoe.core.layouts import TRAINING_FILES
from sbmoe.core.runtime import autocast, resolve_inference, resolve_precision, seed_everything
from sbmoe.data.beir import BeirCollection
from sbmoe.data.training_files import TrainingFileCollection, training_collection
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.routing import RoutingTracker
from sbmoe.model.card import describe_head
from sbmoe.model.retriever import Retriever
from sbmoe.training.batching import BatchOrder, length_grouped_batches, shuffled_batches
from sbmoe.training.checkpoint import (
    Checkpoint,
    RandomState,
    read_checkpoint,
    refuse_pickled,
    refusing_misfits,
    write_checkpoint,
)
from sbmoe.training.dev_evaluation import DevEvaluator
from sbmoe.training.losses import RouterLoss
from sbmoe.training.optimization import build_loss, build_optimizer, build_scheduler
from sbmoe.training.run import TrainResult, refuse_another_world_size, run_settings
from sbmoe.training.run_log import RunLog, collapse_warnings, startup_line
from sbmoe.training.selection import ModelSelection
from sbmoe.training.trainable import TrainableEncoder
from sbmoe.training.training_data import TrainingData, prepare_training_data, require_head

logger = logging.getLogger(__name__)


# Its size (~320 lines, a fifth of them docstrings) is earned: the loop's cadence (_loop) reads in one
# screen and every piece it drives is its own module (optimization, checkpoint, run_log, selection).
class Trainer:
    """Fine-tunes a :class:`Retriever` on prepared :class:`~sbmoe.training.training_data.TrainingData`.

    :func:`build_trainer` prepares the data and builds one; :func:`train` does everything. Its parts:
    :mod:`~sbmoe.training.optimization` (optimiser, schedule, loss), :mod:`~sbmoe.training.checkpoint`,
    :mod:`~sbmoe.training.run_log` and :mod:`~sbmoe.training.selection`.

    Args:
        retriever: The model to train (its weights change in place).
        data: Pairs, dev judgements, hard negatives, pooled texts (see
            :func:`~sbmoe.training.training_data.prepare_training_data`).
        config: Training settings.
        output_dir: Where the model and ``training/`` go.
        options: Progress bars (rank 0 only), the command line recorded beside the outputs, and the
            pooled-embedding cache of dev evaluation (it pays off where the backbone is unchanged:
            the starting model, or a final model that is evaluated again).
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
        options: JobOptions | None = None,
        context: DistributedContext | None = None,
    ) -> None:
        options = options or JobOptions()
        config.validate()
        self.context = context or DistributedContext(device=retriever.device)
        if self.context.device != retriever.device:
            raise UsageError(
                f"the model is on {retriever.device} but this process computes on {self.context.device}"
            )
        self.retriever, self.data, self.config, self.command = retriever, data, config, options.command
        self.output_dir = Path(output_dir)
        self.training_dir = self.output_dir / TRAINING_FILES.folder
        self.is_main = self.context.is_main
        self.show_progress = options.show_progress and self.is_main
        self.precision = resolve_precision(config.precision, retriever.device)
        global_batch_size = config.batch_size * self.context.world_size
        self.batch_order: BatchOrder = (
            length_grouped_batches(config.seed, global_batch_size, data.document_lengths())
            if config.length_grouped
            else shuffled_batches(config.seed, global_batch_size)
        )
        self.steps_per_epoch = len(self.batches(0))
        # As in Hugging Face's Trainer, max_steps wins over epochs (more epochs run if it asks for them).
        self.total_steps = config.max_steps or self.steps_per_epoch * config.epochs
        frozen_backbone = require_head(retriever, config)
        self.dev_evaluator = DevEvaluator(data, config, options.cache)
        self.optimizer = build_optimizer(retriever, config, frozen_backbone)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps)
        router = RouterLoss.for_head(retriever.head, config, self.context)
        # DDP (under several processes) wraps the model after the backbone is frozen, so it ignores
        # frozen parameters; it also starts every process from rank 0's weights.
        encoder = TrainableEncoder(retriever, data, frozen_backbone, router_gradients=router is not None)
        self.model = data_parallel(encoder, self.context)
        self.loss = build_loss(self.model, retriever, data, config, router, self.context)
        self.step = 0
        self.selection = ModelSelection(
            config.checkpoint_selection, self.training_dir / TRAINING_FILES.best, self.is_main
        )
        self.log = RunLog(self.training_dir, self.is_main)
        self.routing = RoutingTracker()
        self.setup: dict[str, Any] = {}  # the start-up record, kept for the model card

    def batches(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches; under several processes, those too small to split are left out."""
        batches = self.batch_order(epoch, len(self.data.pairs))
        if self.context.is_distributed:
            batches = [batch for batch in batches if len(batch) >= self.context.world_size]
        return batches

    def run_config(self) -> dict[str, Any]:
        """Everything that determines this run, saved beside it and compared on resume."""
        return {
            **run_settings(self.retriever.config, self.config, self.data.collection),
            "data": {"name": self.data.collection.name, "root": str(self.data.collection.root)},
            "world_size": self.context.world_size,
        }

    def startup_record(self, resumed_from: int | None) -> dict[str, Any]:
        """The ``start`` record of ``log.jsonl``: what is about to be trained, on what, where and how.

        Args:
            resumed_from: The step a resumed run goes on from (``None``: a fresh run).
        """
        retriever, data, config = self.retriever, self.data, self.config
        world_size = self.context.world_size
        if config.head_only:
            trains = "head only (pooled embeddings cached)"
        elif config.freeze_backbone:
            trains = "head only (frozen backbone)"
        else:
            trains = "backbone and head" if retriever.head_module is not None else "backbone"
        dev = resolve_inference("auto", config.precision, retriever.device)
        if config.dev_split is not None and config.dev_split in data.collection.qrels:
            dev_set = f"split {config.dev_split}"
        else:
            dev_set = f"{config.dev_fraction:.0%} of the {config.train_split} queries, held out"
        return {
            "step": resumed_from or 0,
            "event": "start",
            "data": data.collection.name,
            "training_pairs": len(data.pairs),
            "dev_queries": len(self.dev_evaluator.query_ids),
            "dev_set": dev_set,
            "steps_per_epoch": self.steps_per_epoch,
            "total_steps": self.total_steps,
            "batch_size": config.batch_size * world_size,
            "processes": world_size,
            "hard_negatives": config.hard_negatives,
            "device": str(retriever.device),
            "precision": self.precision,
            "backend": "torch",
            "dev_backend": f"{dev.backend} {dev.precision}",
            "head": describe_head(retriever.config),
            "trains": trains,
            "output_dir": str(self.output_dir),
            "resumed_from_step": resumed_from,
        }

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> TrainResult:
        """Run (or resume) training; returns the summary. The kept model ends up in ``output_dir``."""
        done_file = self.training_dir / TRAINING_FILES.done
        summary = self.context.run_on_main(lambda: read_json(done_file) if done_file.exists() else None)
        if summary is not None:
            logger.info("%s is already trained; nothing to do", self.output_dir)
            return TrainResult(**{**summary, "output_dir": Path(summary["output_dir"])})
        started = time.perf_counter()
        # Rank 0 draws exactly what a single process would; the others get streams of their own
        # (dropout, gate noise). The batch order has its own generator, shared by all.
        seed_everything(self.config.seed + self.context.rank)
        position = self._resume()
        resumed_from = self.step if position else None
        self._start(resumed_from)
        if position is None and self.config.checkpoint_selection == "best":
            self.evaluate_and_select(epoch=0)  # the starting model competes too
        progress = {"desc": "train", "unit": "step", "disable": not self.show_progress}
        try:
            with tqdm(total=self.total_steps, initial=self.step, **progress) as bar:
                self._loop(*(position or (0, 0)), bar)
            return self._finish(started, resumed_from)
        finally:
            self.log.close()  # after _finish, so its warning reaches TensorBoard too

    def _loop(self, start_epoch: int, start_batch: int, bar: tqdm) -> None:
        """Step to ``total_steps``: evaluate and checkpoint every so many steps and after each epoch."""
        eval_steps, checkpoint_steps = self.config.eval_steps, self.config.checkpoint_steps
        epoch = start_epoch
        while self.step < self.total_steps:
            batches = self.batches(epoch)
            for batch_index in range(start_batch if epoch == start_epoch else 0, len(batches)):
                self._step(batches[batch_index], epoch, bar)
                if self.step >= self.total_steps:
                    break
                if eval_steps and self.step % eval_steps == 0:
                    self.evaluate_and_select(epoch)
                if checkpoint_steps and self.step % checkpoint_steps == 0:
                    self._save_checkpoint(epoch, batch_index + 1)
            epoch += 1
            self._log_routing(epoch)
            if not (eval_steps and self.step % eval_steps == 0) or self.step >= self.total_steps:
                self.evaluate_and_select(epoch)
            self._save_checkpoint(epoch, 0)

    def _step(self, positions: Sequence[int], epoch: int, bar: tqdm) -> None:
        terms = self.training_step(positions)
        self.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{terms['loss']:.4f}")
        self.log.record(
            {"step": self.step, "epoch": epoch, "event": "train", "lr": self.scheduler.get_last_lr(), **terms}
        )
        if not math.isfinite(terms["loss"]):
            error = TrainingDivergedError(
                f"the training loss became non-finite ({terms['loss']}) at step {self.step}: training "
                "diverged, and no model of this run was saved. Lower the learning rate "
                f"(--lr-backbone {self.config.lr_backbone:g}, --lr-head {self.config.lr_head:g}) and "
                "train again with --overwrite"
            )
            error.step, error.rates = self.step, f"{self.config.lr_backbone:g} / {self.config.lr_head:g}"
            raise error

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

    def evaluate_and_select(self, epoch: int) -> float:
        """Score dev nDCG@10; keep the model as best if it improves (or always, under ``last``)."""
        started = time.perf_counter()
        # Every process scores its slice of the corpus; all of them get the same score, so they
        # take the same decisions.
        score = self.dev_evaluator.ndcg10(self.retriever, self.show_progress, self.context)
        improved = self.selection.consider(self.retriever, self.step, epoch, score)
        seconds = round(time.perf_counter() - started, 2)
        self.log.record({**self.selection.history[-1], "event": "dev", "seconds": seconds})
        logger.info("step %d: dev nDCG@10 = %.4f%s", self.step, score, " (best)" if improved else "")
        return score

    def _log_routing(self, epoch: int) -> None:
        """Log the epoch's expert usage (training selections) and warn when one expert takes over."""
        summary, self.routing = self.routing.summary(), RoutingTracker()
        if summary:
            self.log.record({"step": self.step, "epoch": epoch, "event": "routing", **summary})
            for message in collapse_warnings(summary, self.config.collapse_threshold, epoch):
                warnings.warn(message, RuntimeWarning, stacklevel=3)

    # ------------------------------------------------------------------------------------- state
    def _save_checkpoint(self, epoch: int, batch_index: int) -> None:
        # Each process's random state (dropout, gate noise) goes into rank 0's checkpoint.
        rng = self.context.all_gather_object(RandomState.capture(self.retriever.device))
        if self.is_main:
            checkpoint = Checkpoint(
                step=self.step,
                epoch=epoch,
                batch_index=batch_index,
                log_bytes=self.log.size(),
                selection=self.selection.state(),
                model=self.retriever.model.state_dict(),
                optimizer=self.optimizer.state_dict(),
                scheduler=self.scheduler.state_dict(),
                rng=rng,
            )
            write_checkpoint(self.training_dir / TRAINING_FILES.checkpoint, checkpoint)

    def _resume(self) -> tuple[int, int] | None:
        """Go on from this run's checkpoint, if any: the epoch and batch to start at (else ``None``)."""
        checkpoint = self.context.run_on_main(self._read_checkpoint)
        if checkpoint is None:
            return None
        broadcast_module(self.retriever.model, self.context)
        with refusing_misfits(self.training_dir / TRAINING_FILES.checkpoint):
            self.optimizer.load_state_dict(checkpoint.optimizer)
            self.scheduler.load_state_dict(
                {key: checkpoint.scheduler[key] for key in self.scheduler.state_dict()}
            )
            checkpoint.rng[self.context.rank].restore(self.retriever.device)
        self.step = checkpoint.step
        self.selection.restore(checkpoint.selection)
        return checkpoint.epoch, checkpoint.batch_index

    def _read_checkpoint(self) -> Checkpoint | None:
        """On rank 0: the output's checkpoint of this run, its weights restored and the log cut back to it."""
        settings = run_settings(self.retriever.config, self.config, self.data.collection)
        check_output(self.output_dir, TRAINING_RUN, settings)
        checkpoint = read_checkpoint(self.training_dir / TRAINING_FILES.checkpoint)
        if checkpoint is None:
            return None
        refuse_another_world_size(self.output_dir, self.context.world_size)
        with refusing_misfits(self.training_dir / TRAINING_FILES.checkpoint):
            self.retriever.model.load_state_dict(checkpoint.model)
        self.log.cut(checkpoint.log_bytes)  # the steps logged after the checkpoint are taken again
        return dataclasses.replace(checkpoint, model={})  # the weights reach the others by broadcast

    def _start(self, resumed_from: int | None) -> None:
        """Open the run log; record what is about to be trained, and the run's configuration (rank 0)."""
        if not self.is_main:
            return
        self.log.open(self.config.report_to, [g["name"] for g in self.optimizer.param_groups], resumed_from)
        self.setup = self.startup_record(resumed_from)
        logger.info(startup_line(self.setup))
        self.log.record(self.setup)
        config = {**self.run_config(), **provenance(self.command), "precision": self.precision}
        write_json(self.training_dir / TRAINING_FILES.config, config)

    def _finish(self, started: float, resumed_from: int | None) -> TrainResult:
        warning = self.selection.untrained_warning(self.step, self.retriever.head is not None)
        if warning:
            logger.warning("%s: %s", self.output_dir, warning)
            self.log.record({"step": self.step, "event": "warning", "message": warning})
        result = TrainResult(
            output_dir=self.output_dir,
            steps=self.step,
            best_step=self.selection.best_step,
            best_dev_ndcg10=self.selection.best_score,
            dev_history=self.selection.history,
            seconds=round(time.perf_counter() - started, 2),
            resumed_from_step=resumed_from,
            warning=warning,
        )

        def save_kept_model() -> None:
            kept = self.selection.kept_model()
            card_facts = {"train_config": dataclasses.asdict(self.config), "training_setup": self.setup}
            kept.save(self.output_dir, extra={"training": result.to_dict(), **card_facts})
            self.retriever.model.load_state_dict(kept.model.state_dict())
            write_json(self.training_dir / TRAINING_FILES.done, result.to_dict())

        self.context.run_on_main(save_kept_model)
        broadcast_module(self.retriever.model, self.context)  # every process ends with the kept model
        return result


def build_trainer(
    retriever: Retriever,
    collection: BeirCollection,
    config: TrainConfig,
    output_dir: str | Path,
    options: JobOptions | None = None,
    context: DistributedContext | None = None,
) -> Trainer:
    """Prepare the training data of ``collection`` (mining negatives, pooling texts) and a trainer on it.

    Arguments as :class:`Trainer`'s; see :func:`~sbmoe.training.training_data.prepare_training_data`.
    """
    options = options or JobOptions()
    context = context or DistributedContext(device=retriever.device)

    # Before the expensive part (mining negatives, pooling texts): is output_dir ours to train into,
    # and can its checkpoint (if any) be read safely?
    def check() -> None:
        check_output(output_dir, TRAINING_RUN, run_settings(retriever.config, config, collection))
        refuse_pickled(Path(output_dir) / TRAINING_FILES.folder / TRAINING_FILES.checkpoint)

    context.run_on_main(check)
    if config.head_only and options.cache is None:
        # Pooled embeddings are the whole point: keep them for dev evaluation.
        options = dataclasses.replace(options, cache=EmbeddingCache())
    training_dir = Path(output_dir) / TRAINING_FILES.folder
    preparing = dataclasses.replace(options, show_progress=options.show_progress and context.is_main)
    data = prepare_training_data(retriever, collection, config, training_dir, preparing, context)
    return Trainer(retriever, data, config, output_dir, options, context)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    collection: BeirCollection | None,
    output_dir: str | Path,
    options: JobOptions | None = None,
    context: DistributedContext | None = None,
) -> TrainResult:
    """Build a retriever from ``model_config`` and train it; the best model is saved in ``output_dir``.

    Launched by ``torchrun``, every process calls this: it joins the process group (unless
    ``context`` is given) and trains its share of each global batch of
    ``train_config.batch_size * world_size`` pairs; rank 0 writes the outputs.

    Args:
        collection: What to train on; ``None`` when ``train_config.train_file`` names a training file.
        options: Progress bars, the command recorded, the pooled-embedding cache, and ``overwrite``:
            retrain into an ``output_dir`` that holds a training run of other settings (its
            ``training/`` folder is removed; the old model stays until the new one replaces it).
        context: The data-parallel job, which holds the device too (default:
            :func:`sbmoe.core.distributed.init_distributed`: this process's GPU, else the CPU; pass
            ``init_distributed("cpu")`` for another device).

    Raises:
        UsageError: ``output_dir`` holds something else than a training run, a training run of
            other settings (without ``overwrite``), or another process is training into it; both or
            neither of ``collection`` and ``train_config.train_file`` are given.
        DataError: The training file is malformed.
    """
    options = options or JobOptions()
    context = context or init_distributed()
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
                writing_output(output_dir, TRAINING_RUN, settings, overwrite=options.overwrite)
            )
        )
        training_dir = Path(output_dir) / TRAINING_FILES.folder
        if replacing and context.is_main:
            logger.warning("%s: --overwrite: replacing a training run of other settings", output_dir)
            shutil.rmtree(training_dir)
            training_dir.mkdir()
        return build_trainer(retriever, collection, train_config, output_dir, options, context).train()
