"""Running an experiment grid (:mod:`sbmoe.study.grid`) cell by cell, resumably.

Every cell trains (or not), evaluates on its collection and then zero-shot on every other collection
of the grid (transfer), records expert usage, and writes everything in its own folder
``DIR/cells/<cell id>/``. Running the same grid again skips finished cells and resumes an
interrupted one (training resumes from its checkpoint); a finished cell that lacks an evaluation the
grid now asks for (a collection added) is evaluated on it without retraining; a finished cell whose
settings the grid has since changed is refused rather than reused. A failing cell is recorded in its
``error.json`` and the others go on. ``N`` workers (``worker=(i, N)``) share one output directory.
"""

from __future__ import annotations

import dataclasses
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from sbmoe.config.base import from_dict
from sbmoe.config.jobs import EncodeConfig, EvaluateConfig, JobOptions
from sbmoe.config.provenance import provenance
from sbmoe.core.artifacts import EXPERIMENT, writing_output
from sbmoe.core.distributed import check_shard
from sbmoe.core.errors import TrainingDivergedError, UsageError
from sbmoe.core.io import read_json, write_json
from sbmoe.core.layouts import EXPERIMENT_FILES
from sbmoe.data.beir import BeirCollection, load_collection, resolve_data
from sbmoe.evaluation.evaluate import evaluate_model
from sbmoe.inference.cache import EmbeddingCache
from sbmoe.inference.encoding import encode_pooled
from sbmoe.inference.routing import routing_statistics
from sbmoe.model.retriever import Retriever
from sbmoe.study.controls import ZeroShotModel, evaluate_control
from sbmoe.study.grid import ExperimentGrid, GridCell, cell_configs, eval_dir, expand
from sbmoe.training.trainer import train
from sbmoe.training.training_data import encode_config


@dataclass
class ExperimentSummary:
    """What a run of the grid did."""

    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0


def run_experiment(
    grid: ExperimentGrid,
    output_dir: str | Path,
    options: JobOptions | None = None,
    *,
    worker: tuple[int, int] = (0, 1),
) -> ExperimentSummary:
    """Run every unfinished cell of ``grid`` under ``output_dir``; failures are recorded, not raised.

    Args:
        options: Progress bars and the command recorded (the experiment keeps its own embedding
            cache in ``output_dir/cache``; a finished cell run otherwise is refused, never replaced).
        worker: ``(i, n)`` runs only cells ``i, i + n, i + 2n, ...`` of the grid, so that ``n``
            processes (one per GPU, or several on one) share one output directory.

    Raises:
        UsageError: ``output_dir`` holds something else than an experiment, this worker runs there
            already, a finished cell under it was run with other settings than the grid gives it now
            (then nothing runs), or ``worker`` is not a valid ``(i, n)``.
    """
    options = options or JobOptions()
    output_dir = Path(output_dir)
    started = time.perf_counter()
    index, count = check_shard(*worker, flag="worker")
    cells = expand(grid)[index::count]
    with writing_output(output_dir, EXPERIMENT, role=f"worker-{index}-of-{count}"):
        check_finished_cells(grid, cells, output_dir)
        write_json(
            output_dir / EXPERIMENT_FILES.record,
            {"grid": grid.to_dict(), "provenance": provenance(options.command)},
        )
        summary = ExperimentSummary()
        _run_cells(grid, cells, output_dir, summary, options.show_progress)
    summary.seconds = round(time.perf_counter() - started, 1)
    return summary


def _run_cells(
    grid: ExperimentGrid,
    cells: list[GridCell],
    output_dir: Path,
    summary: ExperimentSummary,
    show_progress: bool,
) -> None:
    """Run the unfinished ``cells``, recording each in ``summary``."""
    cache = EmbeddingCache(output_dir / EXPERIMENT_FILES.cache)
    collections = _CollectionLoader()
    bar = tqdm(cells, desc=f"experiment {grid.name}", unit="cell", disable=not show_progress)
    for cell in bar:
        folder = output_dir / EXPERIMENT_FILES.cells / cell.cell_id
        if _missing_evaluations(cell, folder) == []:
            summary.skipped.append(cell.cell_id)
            continue
        bar.set_postfix_str(cell.cell_id)
        try:
            run_cell(grid, cell, folder, collections, cache, show_progress)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as error:  # a failing cell is recorded and the grid goes on
            write_json(
                folder / EXPERIMENT_FILES.error,
                {
                    "cell": cell.to_dict(),
                    "error": f"{type(error).__name__}: {error}",
                    "traceback": traceback.format_exc(),
                },
            )
            summary.failed[cell.cell_id] = f"{type(error).__name__}: {error}"
            if isinstance(error, TrainingDivergedError):  # a grid sets the rates, not flags
                summary.failed[cell.cell_id] = (
                    f"{type(error).__name__}: the training loss became non-finite at step "
                    f"{error.step}: the cell diverged and saved no model. Lower the grid's train "
                    f"keys lr_backbone / lr_head (now {error.rates}), delete {folder} and run "
                    "the experiment again"
                )
            continue
        summary.finished.append(cell.cell_id)


def _missing_evaluations(cell: GridCell, folder: Path) -> list[str] | None:
    """The collections a finished cell has yet to be evaluated on (``None``: it is not finished)."""
    if not (folder / EXPERIMENT_FILES.done).exists():
        return None
    evaluated = read_json(folder / EXPERIMENT_FILES.done)["evaluations"]
    return [name for name in cell.evaluate_on if name not in evaluated]


def check_finished_cells(grid: ExperimentGrid, cells: list[GridCell], output_dir: Path) -> None:
    """Refuse to reuse a finished cell whose saved settings differ from what ``grid`` gives it now.

    Compared: the model and training configs, the control, the grid's ``evaluate`` settings, and the
    per-collection ``evaluate`` overrides of every collection the cell was evaluated on. A
    collection the grid added since (e.g. by transfer) is no difference: it is evaluated next run.
    """
    for cell in cells:
        folder = output_dir / EXPERIMENT_FILES.cells / cell.cell_id
        if not (folder / EXPERIMENT_FILES.done).exists() or not (folder / EXPERIMENT_FILES.cell).exists():
            continue
        saved = read_json(folder / EXPERIMENT_FILES.cell)
        changed = []
        if saved["cell"].get("control") != cell.control:
            changed.append(f"control {saved['cell'].get('control')!r} -> {cell.control!r}")
        for key, current in zip(("model_config", "train_config"), cell_configs(grid, cell), strict=True):
            with warnings.catch_warnings():
                # A key an older version wrote and this one no longer has does not make a cell differ.
                warnings.simplefilter("ignore")
                before = from_dict(type(current), saved[key])
            changed += [
                f"{f.name} {getattr(before, f.name)!r} -> {getattr(current, f.name)!r}"
                for f in dataclasses.fields(current)
                if getattr(before, f.name) != getattr(current, f.name)
            ]
        if saved.get("evaluate", grid.evaluate) != grid.evaluate:
            changed.append(f"evaluate {saved['evaluate']!r} -> {grid.evaluate!r}")
        overrides = saved.get("evaluate_per_collection", {})
        for name in read_json(folder / EXPERIMENT_FILES.done)["evaluations"]:
            before, now = overrides.get(name, {}), grid.evaluate_per_collection.get(name, {})
            if name in cell.evaluate_on and before != now:
                changed.append(f"evaluate_per_collection.{name} {before!r} -> {now!r}")
        if changed:
            raise UsageError(
                f"{folder} was run with other settings ({'; '.join(changed)}); use another output "
                "directory, or delete that cell to run it again"
            )


def run_cell(
    grid: ExperimentGrid,
    cell: GridCell,
    folder: Path,
    collections: _CollectionLoader,
    cache: EmbeddingCache,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train (unless the variant says not to), evaluate and record routing for one cell.

    A control (``cell.control``) is not trained: :func:`sbmoe.study.controls.evaluate_control` scores it
    and ``done.json`` records how it was set up under ``controls``. A finished cell is only
    evaluated on the collections its ``done.json`` lacks.
    """
    model_config, train_config = cell_configs(grid, cell)
    write_json(
        folder / EXPERIMENT_FILES.cell,
        {
            "cell": cell.to_dict(),
            "model_config": model_config.to_dict(),
            "train_config": train_config.to_dict(),
            "evaluate": grid.evaluate,
            "evaluate_per_collection": {
                name: grid.evaluate_per_collection[name]
                for name in cell.evaluate_on
                if name in grid.evaluate_per_collection
            },
        },
    )
    (folder / EXPERIMENT_FILES.error).unlink(missing_ok=True)
    previous = read_json(folder / EXPERIMENT_FILES.done) if (folder / EXPERIMENT_FILES.done).exists() else {}
    started = time.perf_counter()
    if cell.trains and previous:
        retriever, training = Retriever.load(str(folder / EXPERIMENT_FILES.model)), previous["training"]
    elif cell.trains:
        collection = collections.get(cell.collection)
        options = JobOptions(show_progress=show_progress, cache=cache)
        result = train(model_config, train_config, collection, folder / EXPERIMENT_FILES.model, options)
        retriever = Retriever.load(str(folder / EXPERIMENT_FILES.model))
        training = result.to_dict()
    else:
        # document-prior reads no text; the zero-shot model is built only for what does.
        retriever = None if cell.control == "document-prior" else Retriever.from_config(model_config)
        training = None
    encode = encode_config(train_config)  # the batch size and precision training encodes with
    evaluations = dict(previous.get("evaluations", {}))
    eval_seconds = dict(previous.get("eval_seconds", {}))
    controls = dict(previous.get("controls", {}))
    for name in cell.evaluate_on:
        if name in evaluations:
            continue
        target = collections.get(name)
        evaluate = EvaluateConfig(**grid.evaluate_settings(name))
        if cell.control == "procrustes" and name != cell.collection:
            # Fitted on the training collection's pairs (saved by its evaluation, which comes
            # first); elsewhere the map is evaluated as any trained model is.
            retriever = Retriever.load(str(eval_dir(folder, cell.collection) / EXPERIMENT_FILES.model))
        elif cell.control is not None:
            zero_shot = ZeroShotModel(retriever, encode, cache) if retriever is not None else None
            output = evaluate_control(
                cell.control, target, eval_dir(folder, name), evaluate, train_config, zero_shot
            )
            evaluations[name] = {"model": output.result.metrics}
            eval_seconds[name] = output.seconds
            controls[name] = output.details
            continue
        if retriever.head is None:
            evaluate.expert_poolings = []
        options = JobOptions(show_progress=False, cache=cache)
        outputs = evaluate_model(retriever, target, eval_dir(folder, name), evaluate, encode, options)
        evaluations[name] = {out.name: out.result.metrics for out in outputs}
        eval_seconds[name] = round(outputs[0].seconds, 2)  # one encoding pass serves every rule
        if retriever.head is not None:
            routing = _routing(retriever, target, evaluate, encode, cache)
            write_json(eval_dir(folder, name) / EXPERIMENT_FILES.routing, routing)
    summary = {
        "cell": cell.to_dict(),
        "training": training,
        "evaluations": evaluations,
        "eval_seconds": eval_seconds,
        "seconds": round(previous.get("seconds", 0) + time.perf_counter() - started, 1),
    }
    if cell.control is not None:
        summary["controls"] = controls
    write_json(folder / EXPERIMENT_FILES.done, summary)
    return summary


def _routing(
    retriever: Retriever, collection: BeirCollection, evaluate: EvaluateConfig, encode: EncodeConfig, cache
) -> dict:
    """Expert usage of the split's queries and of the corpus (pooled embeddings come from the cache).

    A query-side head routes no document: its routing has queries only.
    """
    query_ids = sorted(q for q in collection.split_qrels(evaluate.split) if q in collection.queries)
    queries = [collection.queries[q] for q in query_ids]
    options = JobOptions(show_progress=False, cache=cache)
    pooled = encode_pooled(retriever, queries, "query", encode, options=options)
    routing = {"queries": routing_statistics(retriever, pooled)}
    if retriever.head_changes_documents:
        documents = [doc.full_text for doc in collection.corpus.values()]
        embeddings = encode_pooled(retriever, documents, "document", encode, options=options)
        routing["documents"] = routing_statistics(retriever, embeddings)
    return routing


class _CollectionLoader:
    """Loads each collection once per experiment run."""

    def __init__(self) -> None:
        self._loaded: dict[str, BeirCollection] = {}

    def get(self, name: str) -> BeirCollection:
        if name not in self._loaded:
            self._loaded[name] = load_collection(resolve_data(name))
        return self._loaded[name]
