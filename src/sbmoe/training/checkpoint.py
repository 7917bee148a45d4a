"""The training checkpoint: one folder, written atomically, holding nothing that can run code.

Layout of ``training/checkpoint/``::

    model.safetensors      the model's weights
    optimizer.safetensors  the optimiser's state tensors (AdamW's moments and step counts)
    rng.safetensors        each process's torch (and CUDA) random state, as uint8 tensors
    state.json             step, epoch and position in the epoch's batches, model selection, length
                           of log.jsonl, scheduler state, the optimiser's hyperparameters, each
                           process's numpy and Python random state (exact integers)

safetensors holds only tensors and JSON only data, so reading a checkpoint someone handed you runs
none of its contents. The run's settings are not repeated here: ``training/config.json`` holds them
and is compared on resume. A checkpoint of sbmoe 0.1.0 (``optimizer.pt``, a pickle) is refused
unread.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sbmoe.core.errors import UsageError, first_line
from sbmoe.core.io import atomic_directory, read_json, recover_directory, write_json
from sbmoe.core.layouts import TRAINING_FILES

FORMAT = 2
# The fields of state.json and their types, checked on reading.
_STATE_FIELDS: dict[str, type] = {
    "step": int,
    "epoch": int,
    "batch_index": int,
    "log_bytes": int,
    "selection": dict,
    "scheduler": dict,
    "optimizer": dict,
    "rng": list,
}
_KIND_NAMES = {int: "a whole number", dict: "an object", list: "a list"}


@dataclass
class RandomState:
    """One process's random generators: torch's, CUDA's (on a GPU), numpy's and Python's."""

    torch: torch.Tensor
    numpy: dict[str, Any]
    python: dict[str, Any]
    cuda: torch.Tensor | None = None

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        """The current state of every generator this process draws from."""
        _, keys, position, has_gauss, cached_gaussian = np.random.get_state()
        version, internal, gauss_next = random.getstate()
        return cls(
            torch=torch.get_rng_state(),
            numpy={
                "keys": keys.tolist(),
                "position": position,
                "has_gauss": has_gauss,
                "cached_gaussian": cached_gaussian,
            },
            python={"version": version, "state": list(internal), "gauss_next": gauss_next},
            cuda=torch.cuda.get_rng_state(device).cpu() if device.type == "cuda" else None,
        )

    def restore(self, device: torch.device) -> None:
        """Set every generator back to this state."""
        torch.set_rng_state(self.torch)
        n, p = self.numpy, self.python
        keys = np.array(n["keys"], dtype=np.uint32)
        np.random.set_state(("MT19937", keys, n["position"], n["has_gauss"], n["cached_gaussian"]))
        random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
        if self.cuda is not None and device.type == "cuda":
            torch.cuda.set_rng_state(self.cuda, device)


@dataclass
class Checkpoint:
    """Everything a training run needs to go on exactly where it stopped.

    Attributes:
        step: Optimiser steps taken.
        epoch: The epoch to go on with.
        batch_index: The next batch of that epoch.
        log_bytes: Length of ``log.jsonl`` at this step (what a killed run logged later is cut).
        selection: Model selection's state (:meth:`~sbmoe.training.selection.ModelSelection.state`).
        model: The model's state dict.
        optimizer: The optimiser's state dict.
        scheduler: The learning-rate scheduler's state dict (plain data).
        rng: Each process's random state, in rank order.
    """

    step: int
    epoch: int
    batch_index: int
    log_bytes: int
    selection: dict[str, Any]
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    rng: list[RandomState]


def write_checkpoint(directory: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``directory``, replacing the previous one only once it is complete."""
    optimizer_tensors, optimizer_data = _split_optimizer(checkpoint.optimizer)
    rng_tensors = {f"{rank}.torch": state.torch for rank, state in enumerate(checkpoint.rng)}
    rng_tensors |= {f"{rank}.cuda": s.cuda for rank, s in enumerate(checkpoint.rng) if s.cuda is not None}
    with atomic_directory(directory) as tmp:
        save_file(_plain(checkpoint.model), str(tmp / TRAINING_FILES.checkpoint_model))
        save_file(_plain(optimizer_tensors), str(tmp / TRAINING_FILES.optimizer))
        save_file(_plain(rng_tensors), str(tmp / TRAINING_FILES.rng))
        write_json(
            tmp / TRAINING_FILES.state,
            {
                "format": FORMAT,
                "step": checkpoint.step,
                "epoch": checkpoint.epoch,
                "batch_index": checkpoint.batch_index,
                "log_bytes": checkpoint.log_bytes,
                "selection": checkpoint.selection,
                "scheduler": checkpoint.scheduler,
                "optimizer": optimizer_data,
                "rng": [{"numpy": state.numpy, "python": state.python} for state in checkpoint.rng],
            },
        )


def read_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The checkpoint in ``directory``, or ``None`` where there is none.

    Raises:
        UsageError: An sbmoe 0.1.0 checkpoint (a pickle, left unread), or a file that is missing,
            unreadable or malformed; the message names it and how to go on.
    """
    directory = Path(directory)
    recover_directory(directory)
    if not directory.exists():
        return None
    refuse_pickled(directory)
    state = _read(directory / TRAINING_FILES.state, read_json)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        found = state.get("format") if isinstance(state, dict) else None
        raise UsageError(
            f"{directory / TRAINING_FILES.state}: checkpoint format {found!r}, this sbmoe reads format "
            f"{FORMAT}: delete {directory} to train this run again from its start"
        )
    for name, kind in _STATE_FIELDS.items():
        if not isinstance(state.get(name), kind) or isinstance(state.get(name), bool):
            raise UsageError(
                f"{directory / TRAINING_FILES.state}: field `{name}` must be {_KIND_NAMES[kind]}: the "
                f"checkpoint is damaged; delete {directory} to train this run again from its start"
            )
    model = _read(directory / TRAINING_FILES.checkpoint_model, _load_tensors)
    optimizer_tensors = _read(directory / TRAINING_FILES.optimizer, _load_tensors)
    rng_tensors = _read(directory / TRAINING_FILES.rng, _load_tensors)
    try:
        selection = {key: state["selection"][key] for key in ("best_score", "best_step", "dev_history")}
        optimizer = _join_optimizer(optimizer_tensors, state["optimizer"])
        rng = [
            RandomState(
                rng_tensors[f"{rank}.torch"], saved["numpy"], saved["python"], rng_tensors.get(f"{rank}.cuda")
            )
            for rank, saved in enumerate(state["rng"])
        ]
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(
            f"{directory} does not hold a whole checkpoint ({type(error).__name__}: {first_line(error)}): "
            f"delete {directory} to train this run again from its start"
        ) from error
    return Checkpoint(
        step=state["step"],
        epoch=state["epoch"],
        batch_index=state["batch_index"],
        log_bytes=state["log_bytes"],
        selection=selection,
        model=model,
        optimizer=optimizer,
        scheduler=state["scheduler"],
        rng=rng,
    )


def refuse_pickled(directory: str | Path) -> None:
    """Refuse a checkpoint of sbmoe 0.1.0 in ``directory`` (its pickle is never opened).

    Raises:
        UsageError: ``directory`` holds ``optimizer.pt``.
    """
    directory = Path(directory)
    if (directory / TRAINING_FILES.pickled_optimizer).exists():
        raise UsageError(
            f"{directory} is a checkpoint of sbmoe 0.1.0, whose {TRAINING_FILES.pickled_optimizer} is a "
            f"pickle that could run code when loaded, so it is not read: delete {directory} to train this "
            "run again from its start, or resume it with sbmoe 0.1.0 if you trust where it came from"
        )


@contextlib.contextmanager
def refusing_misfits(directory: str | Path) -> Iterator[None]:
    """Turn a checkpoint's state that does not fit this run's model or optimiser into a UsageError."""
    try:
        yield
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as error:
        raise UsageError(
            f"{directory} does not fit this run ({type(error).__name__}: {first_line(error)}): delete "
            f"{directory} to train this run again from its start"
        ) from error


def _plain(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous, detached copies, as safetensors stores them."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _split_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser's state dict as tensors (``INDEX.NAME``) and JSON data (hyperparameters, other values)."""
    tensors: dict[str, torch.Tensor] = {}
    values: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                values.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "values": values}


def _join_optimizer(tensors: dict[str, torch.Tensor], data: dict[str, Any]) -> dict[str, Any]:
    """The state dict :func:`_split_optimizer` took apart."""
    state: dict[int, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for index, values in data["values"].items():
        state.setdefault(int(index), {}).update(values)
    # JSON has no tuples: every list in a group but its parameter indices was one (AdamW's betas).
    groups = [
        {
            key: value if key == "params" or not isinstance(value, list) else tuple(value)
            for key, value in group.items()
        }
        for group in data["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def _read(path: Path, read: Callable[[Path], Any]) -> Any:
    """``read(path)``, with a missing or unreadable (truncated, corrupt) file named in a UsageError."""
    if not path.is_file():
        raise UsageError(
            f"{path} is missing: the checkpoint is damaged; delete {path.parent} to train this run again "
            "from its start"
        )
    try:
        return read(path)
    except Exception as error:  # safetensors and json each raise their own kinds
        raise UsageError(
            f"{path} is unreadable ({type(error).__name__}: {first_line(error)}): the checkpoint is "
            f"damaged; delete {path.parent} to train this run again from its start"
        ) from error
