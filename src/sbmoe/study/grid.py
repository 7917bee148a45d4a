"""Experiment grids: backbones x collections x variants x experts x seeds, expanded into cells.

A grid file (YAML) names the axes; every combination is a *cell* (:class:`GridCell`) that
:mod:`sbmoe.study.experiments` runs. This module reads, checks and expands grids and resolves a
cell's configs; it runs nothing.

Grid file keys (all but ``backbones``/``collections``/``variants`` optional)::

    name: scifact-cpu
    preset: default                  # or paper
    backbones: [all-MiniLM-L6-v2]    # names, directories, or registered short names (tinybert, ...)
    collections: [scifact, nfcorpus] # train on each; evaluate on it, then on the others (transfer)
    transfer: {msmarco: [scifact]}   # also evaluate models trained on msmarco on scifact;
                                     #   `transfer: false`: each cell on its own collection only
    variants:                        # name -> model settings; `train:` holds training overrides,
      fine-tuned: {num_experts: 0}   #   `train: false` evaluates the backbone untrained
      sb-moe: {gating: learned}
      linear: {head: linear}         # the linear residual adapter (no experts: not on the experts axis)
      prior: {control: document-prior}  # untrained controls (sbmoe.study.controls): document-prior,
                                     #   zero-shot+prior
    experts: [3, 6, 9, 12]           # for every variant whose num_experts is not 0
    seeds: [1, 2, 3]                 # untrained cells (train: false, controls) run the first only
    model: {max_doc_length: 256}     # for every cell
    train: {epochs: 1}
    train_per_collection:            # training settings for cells trained on one collection
      nfcorpus: {max_steps: 300}     #   (over `train`, under a variant's own `train:`)
    evaluate: {split: test, expert_poolings: [top1, all]}
    evaluate_per_collection:         # `evaluate` settings that differ for one evaluated collection
      arguana: {exclude_self: true}  #   (BEIR drops a query's own document from ArguAna's ranking)
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sbmoe.config.base import from_dict
from sbmoe.config.jobs import EvaluateConfig
from sbmoe.config.model import ModelConfig
from sbmoe.config.presets import build_configs
from sbmoe.config.train import TrainConfig
from sbmoe.core.choices import CONTROLS, PRIOR_CONTROLS
from sbmoe.core.errors import UsageError
from sbmoe.core.io import atomic_open, read_json
from sbmoe.core.layouts import EXPERIMENT_FILES
from sbmoe.core.yaml_reader import read_yaml

# The study's backbones: hub name, pooling, and the temperature of the published recipe.
# Under the paper preset a cell also takes the published temperature and number of epochs.
REGISTERED_BACKBONES: dict[str, dict[str, Any]] = {
    "tinybert": {
        "name": "huawei-noah/TinyBERT_General_4L_312D",
        "pooling": "mean",
        "temperature": 1.0,
        "epochs": 30,
    },
    "bert-small": {
        "name": "google/bert_uncased_L-4_H-512_A-8",
        "pooling": "mean",
        "temperature": 1.0,
        "epochs": 20,
    },
    "bert-base": {"name": "bert-base-uncased", "pooling": "mean", "temperature": 1.0, "epochs": 20},
    "contriever": {"name": "facebook/contriever", "pooling": "mean", "temperature": 0.05, "epochs": 20},
    "minilm": {"name": "all-MiniLM-L6-v2", "pooling": "mean", "temperature": 0.05, "epochs": 20},
}

GRID_KEYS = {
    "name",
    "preset",
    "backbones",
    "collections",
    "transfer",
    "variants",
    "experts",
    "seeds",
    "model",
    "train",
    "evaluate",
    "train_per_collection",
    "evaluate_per_collection",
}


@dataclass
class ExperimentGrid:
    """The axes of an experiment and the settings shared by its cells."""

    name: str
    backbones: list[str]
    collections: list[str]
    variants: dict[str, dict[str, Any]]
    experts: list[int] = field(default_factory=lambda: [6])
    seeds: list[int] = field(default_factory=lambda: [42])
    preset: str = "default"
    # True: every cell is also evaluated on the grid's other collections; a mapping adds, per
    # training collection, more collections to that; False: each cell on its own collection only.
    transfer: dict[str, list[str]] | bool = True
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    evaluate: dict[str, Any] = field(default_factory=dict)
    train_per_collection: dict[str, dict[str, Any]] = field(default_factory=dict)
    evaluate_per_collection: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The grid's keys, as a grid file holds them."""
        return dataclasses.asdict(self)

    def evaluation_collections(self, collection: str) -> list[str]:
        """Where a cell trained on ``collection`` is evaluated: there first, then transfer targets."""
        if self.transfer is False:
            return [collection]
        extra = self.transfer.get(collection, []) if isinstance(self.transfer, dict) else []
        return list(dict.fromkeys([collection, *self.collections, *extra]))

    def evaluate_settings(self, collection: str) -> dict[str, Any]:
        """The ``evaluate`` settings for ``collection``: the grid's, with its own overrides on top."""
        return {**self.evaluate, **self.evaluate_per_collection.get(collection, {})}


@dataclass
class GridCell:
    """One run of the grid: train a variant of a backbone on a collection with a seed."""

    backbone: str
    collection: str
    variant: str
    experts: int
    seed: int
    trains: bool
    model: dict[str, Any]
    train: dict[str, Any]
    evaluate_on: list[str]
    control: str | None = None

    @property
    def cell_id(self) -> str:
        parts = [slug(self.backbone), slug(self.collection), slug(self.variant)]
        if self.experts:
            parts.append(f"n{self.experts}")
        parts.append(f"s{self.seed}")
        return "__".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "cell_id": self.cell_id}


def slug(text: str) -> str:
    """A file-name-safe form of ``text`` (runs of other characters become one '-')."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")


def eval_dir(cell_folder: Path, collection: str) -> Path:
    """Where a cell's evaluation on ``collection`` (a name or a folder) is written."""
    return cell_folder / EXPERIMENT_FILES.evaluations / slug(collection)


def load_grid(path: str | Path) -> ExperimentGrid:
    """Read and check a grid file; errors name the file and the key."""
    return check_grid(read_yaml(path), path)


def save_grid(grid: ExperimentGrid, path: str | Path) -> Path:
    """Write ``grid`` as a grid file that :func:`load_grid` reads back."""
    path = Path(path)
    with atomic_open(path) as handle:
        yaml.safe_dump(grid.to_dict(), handle, sort_keys=False)
    return path


def check_grid(data: Any, path: str | Path = "grid") -> ExperimentGrid:
    """Build a grid from its keys (as a grid file holds them); errors name ``path`` and the key."""
    if not isinstance(data, dict) or not data:
        raise UsageError(f"{path}: expected a mapping of grid keys at the top level")
    unknown = sorted(map(str, set(data) - GRID_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown keys {unknown}; allowed: {sorted(GRID_KEYS)}")
    for key in ("backbones", "collections", "variants"):
        if not data.get(key):
            raise UsageError(f"{path}: `{key}` is missing or empty")
    for key, value in data.items():
        check, shape = _SHAPES[key]
        if not check(value):
            raise UsageError(f"{path}: `{key}` must be {shape}, got {_shown(value)}")
    data.setdefault("name", Path(path).stem)
    if Path(str(data["name"])).name != data["name"] or data["name"] in (".", ".."):  # before: runs/../../x
        raise UsageError(
            f"{path}: `name` {data['name']!r} must be a plain folder name (the default output is runs/NAME)"
        )
    grid = ExperimentGrid(**data)
    for name, settings in grid.variants.items():
        settings = settings or {}
        grid.variants[name] = settings
        _check_variant(name, settings, path)
    for key, cls in (("model", ModelConfig), ("train", TrainConfig), ("evaluate", EvaluateConfig)):
        _check_settings(getattr(grid, key), cls, f"`{key}`", path)
    evaluated = {name for c in grid.collections for name in grid.evaluation_collections(c)}
    _check_per_collection(grid, "train_per_collection", TrainConfig, set(grid.collections), path)
    _check_per_collection(grid, "evaluate_per_collection", EvaluateConfig, evaluated, path)
    try:
        _check_distinct(sorted(evaluated), "evaluation", slug)
        for cell in expand(grid):  # refuses cells that would share a folder
            try:  # each cell's settings as its training checks them (seed, epochs...), before any runs
                cell_configs(grid, cell)
            except UsageError as error:
                raise UsageError(f"cell {cell.cell_id}: {error}") from None
    except UsageError as error:
        raise UsageError(f"{path}: {error}") from None
    for name in sorted(evaluated):  # a bad metric would otherwise surface after each cell's training
        try:
            from_dict(EvaluateConfig, grid.evaluate_settings(name), source=str(path)).validate()
        except UsageError as error:
            raise UsageError(f"{path}: `evaluate` for {name}: {error}") from None
    return grid


def _check_variant(name: str, settings: dict[str, Any], path: str | Path) -> None:
    """A variant's model settings, its ``train`` (settings or false) and its ``control``."""
    model = {key: value for key, value in settings.items() if key not in ("train", "control")}
    _check_settings(model, ModelConfig, f"variant {name!r}", path)
    train = settings.get("train")
    if train is not None and train is not False:
        if not _is_settings(train):
            raise UsageError(
                f"{path}: variant {name!r}: `train` must be false or a mapping of settings, "
                f"got {_shown(train)}"
            )
        _check_settings(train, TrainConfig, f"variant {name!r} `train`", path)
    control = settings.get("control")
    if control is not None and control not in CONTROLS:
        raise UsageError(f"{path}: variant {name!r}: unknown control {control!r}; choose from {CONTROLS}")
    if control is not None and settings.get("train", False) is not False:
        raise UsageError(f"{path}: variant {name!r}: a control is never trained; drop its `train`")


def _check_settings(settings: dict[str, Any], cls: type, where: str, path: str | Path) -> None:
    """``settings`` are fields of ``cls`` holding values of their types (as the configs will check)."""
    bad = sorted(set(settings) - {f.name for f in dataclasses.fields(cls)})
    if bad:
        raise UsageError(f"{path}: {where} has unknown settings {bad}")
    from_dict(cls, settings, source=f"{path}: {where}")


def _is_names(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) and item.strip() for item in value)


def _is_wholes(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(item, int) and not isinstance(item, bool) for item in value)
    )


def _is_settings(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(key, str) for key in value)


def _mapping_of(check: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda value: _is_settings(value) and all(check(item) for item in value.values())


# What each grid key holds, and how a message says it.
_SHAPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda value: isinstance(value, str) and bool(value.strip()), "a name"),
    "preset": (lambda value: isinstance(value, str), "a preset name"),
    "backbones": (_is_names, "a list of names"),
    "collections": (_is_names, "a list of names"),
    # Checked whether or not a variant uses the axis: a grid says what it means or is refused.
    "experts": (lambda value: _is_wholes(value) and min(value) >= 1, "whole numbers >= 1 (a non-empty list)"),
    "seeds": (_is_wholes, "whole numbers (a non-empty list)"),
    "variants": (
        _mapping_of(lambda item: item is None or _is_settings(item)),
        "a mapping of name -> settings",
    ),
    "transfer": (
        lambda value: isinstance(value, bool) or _mapping_of(_is_names)(value),
        "true, false or a mapping of collection -> list of names",
    ),
    "model": (_is_settings, "a mapping of settings"),
    "train": (_is_settings, "a mapping of settings"),
    "evaluate": (_is_settings, "a mapping of settings"),
    "train_per_collection": (_mapping_of(_is_settings), "a mapping of collection -> settings"),
    "evaluate_per_collection": (_mapping_of(_is_settings), "a mapping of collection -> settings"),
}


def _shown(value: Any) -> str:
    """``value`` for a message: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _check_per_collection(
    grid: ExperimentGrid, key: str, cls: type, names: set[str], path: str | Path
) -> None:
    """Each entry of ``grid.<key>`` names one of ``names`` and holds settings of ``cls``."""
    for name, settings in getattr(grid, key).items():
        if name not in names:
            raise UsageError(f"{path}: `{key}` names {name!r}, which is none of {sorted(names)}")
        _check_settings(settings, cls, f"`{key}.{name}`", path)


def expand(grid: ExperimentGrid) -> list[GridCell]:
    """Every cell of the grid, in a stable order (backbone, collection, variant, experts, seed)."""
    cells = []
    for backbone in grid.backbones:
        for collection in grid.collections:
            for variant, settings in grid.variants.items():
                control = settings.get("control")
                trains = control is None and settings.get("train", {}) is not False
                train_overrides = settings.get("train") or {}
                model_overrides = {k: v for k, v in settings.items() if k not in ("train", "control")}
                fixed = model_overrides.get("num_experts", grid.model.get("num_experts"))
                if control is not None or model_overrides.get("head", grid.model.get("head")) == "linear":
                    fixed = 0  # controls and the linear adapter have no experts
                # A variant that fixes its number of experts (0 = no head, 1 = one-expert control)
                # is not expanded over the experts axis.
                for experts in grid.experts if fixed is None else [fixed]:
                    for seed in grid.seeds if trains else grid.seeds[:1]:
                        cells.append(
                            GridCell(
                                backbone=backbone,
                                collection=collection,
                                variant=variant,
                                experts=experts,
                                seed=seed,
                                trains=trains,
                                model={**model_overrides, "num_experts": experts},
                                train=dict(train_overrides),
                                evaluate_on=(
                                    [collection]
                                    if control in PRIOR_CONTROLS
                                    else grid.evaluation_collections(collection)
                                ),
                                control=control,
                            )
                        )
    _check_distinct(cells, "cell", lambda cell: cell.cell_id, _CELL_AXES)
    return cells


_CELL_AXES = ("backbone", "collection", "variant", "experts", "seed")


def _check_distinct(
    items: list[Any], what: str, folder: Callable[[Any], str], axes: tuple[str, ...] = ()
) -> None:
    """Refuse two ``items`` whose ``folder`` names match (case aside: some file systems ignore it).

    A folder name keeps only letters, digits, '.' and '-' (:func:`slug`), so ``zs a`` and ``zs_a``
    would share one folder: the second would be found "already finished" and never run.
    """
    seen: dict[str, Any] = {}
    for item in items:
        first = seen.setdefault(folder(item).casefold(), item)
        if first is item:
            continue
        if axes:
            differ = [
                f"{axis} {getattr(first, axis)!r} and {getattr(item, axis)!r}"
                for axis in axes
                if getattr(first, axis) != getattr(item, axis)
            ]
            named = "; ".join(differ) or "a repeated entry"
        else:
            named = f"{first!r} and {item!r}"
        raise UsageError(
            f"{named} would share the {what} folder {folder(item)!r} (folder names keep only letters, "
            "digits, '.' and '-', and some file systems ignore case): rename one, or drop the repeat"
        )


def cell_configs(grid: ExperimentGrid, cell: GridCell) -> tuple[ModelConfig, TrainConfig]:
    """Resolve a cell's model and training configs: preset, backbone registry, grid, the training
    collection's ``train_per_collection`` entry, variant, cell."""
    registered = REGISTERED_BACKBONES.get(cell.backbone, {})
    backbone = registered.get("name", cell.backbone)
    model = {"backbone": backbone}
    train_settings: dict[str, Any] = {"seed": cell.seed}
    if registered and grid.preset == "paper":
        model["pooling"] = registered["pooling"]
        train_settings["temperature"] = registered["temperature"]
        train_settings["epochs"] = registered["epochs"]
    model.update(grid.model)
    model.update(cell.model)
    model.setdefault("num_experts", cell.experts)
    train_settings.update(grid.train)
    train_settings.update(grid.train_per_collection.get(cell.collection, {}))
    train_settings.update(cell.train)
    return build_configs(grid.preset, model, train_settings)


def iter_finished_cells(output_dir: str | Path) -> Iterator[tuple[Path, dict[str, Any]]]:
    """(cell folder, done.json) of every finished cell under ``output_dir``."""
    for done in sorted(Path(output_dir).glob(f"{EXPERIMENT_FILES.cells}/*/{EXPERIMENT_FILES.done}")):
        yield done.parent, read_json(done)
