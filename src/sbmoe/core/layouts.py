"""What each kind of sbmoe artifact holds: its file names, declared once, and how its folder is recognised.

Every module that reads or writes an artifact's files takes their names from here (the
architecture test refuses a declared file name spelled anywhere else), and
:func:`sbmoe.core.artifacts.artifact_kind` recognises folders by the rules below. The kinds:

- a saved model (:data:`MODEL_FILES`): sentence-transformers' format plus ``sbmoe.json``;
- an index (:data:`INDEX_FILES`) and a sharded index (:data:`SHARDED_INDEX_FILES`, a folder of indexes);
- a vector store (:data:`STORE_FILES`: a Milvus Lite database file);
- a training run (:data:`TRAINING_FILES`): a saved model with a ``training/`` folder beside it;
- an evaluation (:data:`EVALUATION_FILES`), an experiment (:data:`EXPERIMENT_FILES`) and a report
  (:data:`REPORT_FILES`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

# The kinds of artifact the output gate (sbmoe.core.artifacts) tells apart.
INDEX = "index"
SHARDED_INDEX = "sharded index"
TRAINING_RUN = "training run"
MODEL = "model"
EVALUATION = "evaluation"
EXPERIMENT = "experiment"
REPORT = "report"

# A temporary of io.atomic_open / io.atomic_directory / Retriever.save: tempfile's 8 random characters.
TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
# Locks, temporaries, kept-aside copies and encoded chunks of writes in progress (e.g. other shards').
IN_PROGRESS = re.compile(rf"{TEMPORARY.pattern}|^\..+\.(lock|old|chunks)$")


def entries(path: Path) -> list[Path]:
    """What the folder ``path`` holds, leaving out what writes in progress keep there."""
    return [entry for entry in path.iterdir() if not IN_PROGRESS.match(entry.name)]


def _names(path: Path) -> set[str]:
    return {entry.name for entry in entries(path)}


# Names several kinds share: a config record, and the weights of a model or a checkpoint.
_CONFIG = "config.json"
_WEIGHTS = "model.safetensors"
_DONE = "done.json"


@dataclass(frozen=True)
class ModelFiles:
    """A saved model: sentence-transformers' files (each stage's config in its folder) and sbmoe's."""

    sbmoe_config: str = "sbmoe.json"
    card: str = "README.md"
    modules: str = "modules.json"
    sentence_transformers_config: str = "config_sentence_transformers.json"
    config: str = _CONFIG
    weights: str = _WEIGHTS
    weights_index: str = "model.safetensors.index.json"
    pickled_weights: str = "pytorch_model.bin"

    def recognises(self, path: Path) -> bool:
        """Whether the folder ``path`` holds a model (sbmoe's, sentence-transformers' or transformers')."""
        names = _names(path)
        return bool(names & {self.sbmoe_config, self.modules, self.sentence_transformers_config}) or (
            self.config in names and bool(names & {self.weights, self.pickled_weights})
        )


@dataclass(frozen=True)
class IndexFiles:
    """A FAISS index: the index, the document id of each row, and what made it (with checksums)."""

    index: str = "index.faiss"
    doc_ids: str = "doc_ids.json"
    meta: str = "meta.json"

    @property
    def own(self) -> frozenset[str]:
        """Every file an index writes."""
        return frozenset({self.index, self.doc_ids, self.meta})

    def recognises(self, path: Path) -> bool:
        """Whether the folder ``path`` is an index (its record and ids suffice: a write in progress)."""
        return {self.meta, self.doc_ids} <= _names(path)


@dataclass(frozen=True)
class ShardedIndexFiles:
    """A sharded index: a folder of indexes named ``shard-00000-of-00004`` ..."""

    shard: re.Pattern[str] = re.compile(r"^shard-(\d+)-of-(\d+)$")

    def shard_name(self, shard: int, num_shards: int) -> str:
        """The folder name of shard ``shard`` of ``num_shards``."""
        return f"shard-{shard:05d}-of-{num_shards:05d}"

    def recognises(self, path: Path) -> bool:
        """Whether the folder ``path`` holds shard folders only."""
        return all(entry.is_dir() and self.shard.match(entry.name) for entry in entries(path))


@dataclass(frozen=True)
class StoreFiles:
    """A vector store kept in a file: Milvus Lite's database."""

    suffix: str = ".db"


@dataclass(frozen=True)
class TrainingFiles:
    """A training run: the trained model's folder with ``training/`` in it (record, log, checkpoints)."""

    folder: str = "training"
    config: str = _CONFIG
    log: str = "log.jsonl"
    done: str = _DONE
    negatives: str = "negatives.json"
    checkpoint: str = "checkpoint"
    best: str = "best"
    # The files of a checkpoint folder.
    checkpoint_model: str = _WEIGHTS
    optimizer: str = "optimizer.safetensors"
    rng: str = "rng.safetensors"
    state: str = "state.json"
    pickled_optimizer: str = "optimizer.pt"  # sbmoe 0.1.0's checkpoints: recognised, never opened

    def recognises(self, path: Path) -> bool:
        """Whether the folder ``path`` is a training run."""
        return (path / self.folder).is_dir()


@dataclass(frozen=True)
class EvaluationFiles:
    """An evaluation: scores, per-query scores, query groups, the run it scored, and its record.

    An evaluation of several inference rules is a folder of such folders.
    """

    metrics: str = "metrics.json"
    per_query: str = "per_query.json"
    query_groups: str = "query_groups.json"
    run: str = "run.trec"
    config: str = _CONFIG

    @property
    def own(self) -> frozenset[str]:
        """Every file an evaluation writes."""
        return frozenset({self.metrics, self.per_query, self.query_groups, self.run, self.config})

    def recognises(self, path: Path) -> bool:
        """Whether the folder ``path`` is an evaluation: its scores beside its record, or folders of them."""
        return self.is_one(path) or all(entry.is_dir() and self.is_one(entry) for entry in entries(path))

    def is_one(self, path: Path) -> bool:
        """Whether the folder ``path`` is one evaluation (of one rule): its scores beside its record."""
        return (path / self.metrics).is_file() and (path / self.config).is_file()


@dataclass(frozen=True)
class ExperimentFiles:
    """An experiment: its record, and a folder per cell (its model, evaluations and records)."""

    record: str = "experiment.json"
    cells: str = "cells"
    cache: str = "cache"
    cell: str = "cell.json"
    done: str = _DONE
    error: str = "error.json"
    model: str = "model"
    evaluations: str = "eval"
    routing: str = "routing.json"

    def recognises(self, path: Path) -> bool:
        """Whether the folder ``path`` is an experiment."""
        return self.record in _names(path)


@dataclass(frozen=True)
class ReportFiles:
    """A report: its tables in three renderings, PNG plots, and the experiment's record kept beside it."""

    markdown: str = "tables.md"
    latex: str = "tables.tex"
    results: str = "results.json"
    plot_suffix: str = ".png"

    @property
    def tables(self) -> tuple[str, ...]:
        """The renderings of the report's tables."""
        return (self.markdown, self.latex, self.results)

    def recognises(self, path: Path) -> bool:
        """Whether the folder ``path`` is a report (reports nested in it count)."""
        fixed = {*self.tables, EXPERIMENT_FILES.record}
        return (path / self.markdown).is_file() and all(
            entry.name in fixed
            or entry.suffix == self.plot_suffix
            or (entry.is_dir() and self.recognises(entry))
            for entry in entries(path)
        )


MODEL_FILES = ModelFiles()
INDEX_FILES = IndexFiles()
SHARDED_INDEX_FILES = ShardedIndexFiles()
STORE_FILES = StoreFiles()
TRAINING_FILES = TrainingFiles()
EVALUATION_FILES = EvaluationFiles()
EXPERIMENT_FILES = ExperimentFiles()
REPORT_FILES = ReportFiles()
LAYOUTS = (
    MODEL_FILES,
    INDEX_FILES,
    SHARDED_INDEX_FILES,
    STORE_FILES,
    TRAINING_FILES,
    EVALUATION_FILES,
    EXPERIMENT_FILES,
    REPORT_FILES,
)
