"""A training run as data: what makes two runs the same, and what a finished run reports."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sbmoe.config.model import ModelConfig
from sbmoe.config.train import TrainConfig
from sbmoe.core.errors import UsageError
from sbmoe.core.io import read_json
from sbmoe.core.layouts import TRAINING_FILES
from sbmoe.data.beir import BeirCollection


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


def refuse_another_world_size(output_dir: Path, world_size: int) -> None:
    """Refuse to resume a run of ``output_dir`` that ran on another number of processes."""
    saved = read_json(output_dir / TRAINING_FILES.folder / TRAINING_FILES.config).get("world_size", 1)
    if saved != world_size:
        raise UsageError(
            f"{output_dir} holds a checkpoint of a run on {saved} process(es), this one has {world_size}: "
            "the global batch would change. Resume with the same number of processes, or choose another "
            "--output"
        )
