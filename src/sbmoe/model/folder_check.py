"""What a model folder may make sbmoe import: stage classes of the installed packages, nothing else.

sbmoe never loads a model with ``trust_remote_code``. The stages a folder's ``modules.json`` lists
are resolved here, by exact class path, to classes of the installed sbmoe and sentence-transformers
(:data:`STAGE_CLASSES`); a folder that names anything else that would import code (another stage
type, a Dense activation outside torch, ``auto_map`` in a config: Python files of its own), or whose
weights would be unpickled (``pytorch_model.bin`` with no safetensors beside it), is refused, naming
the file, before anything is imported or read. Every file reachable from the folder counts,
through symbolic links too (each real folder once, so a link loop ends).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from sentence_transformers.base.modules import Dense, Normalize, Transformer
from sentence_transformers.sentence_transformer.modules import LayerNorm, Pooling

from sbmoe.core.errors import ModelLoadError, first_line
from sbmoe.core.layouts import MODEL_FILES
from sbmoe.model.adapters import LinearAdapter
from sbmoe.model.moe_head import MoEHead

_ST_STAGES = (Transformer, Pooling, Dense, LayerNorm, Normalize)
# modules.json "type" -> the class it loads. Besides today's paths (what sentence-transformers writes:
# the class's module and name), the paths sentence-transformers < 6 and sbmoe 0.1.0 wrote.
STAGE_CLASSES: dict[str, type] = {
    **{f"{cls.__module__}.{cls.__name__}": cls for cls in (*_ST_STAGES, MoEHead, LinearAdapter)},
    **{f"sentence_transformers.models.{cls.__name__}": cls for cls in _ST_STAGES},
    "sbmoe.moe_head.MoEHead": MoEHead,
    "sbmoe.adapters.LinearAdapter": LinearAdapter,
}
_NO_CODE = "sbmoe loads no code a model folder brings with it"
_PICKLED_WEIGHTS = re.compile(r"pytorch_model(-\d+-of-\d+)?\.bin")
_SAFETENSORS_WEIGHTS = (MODEL_FILES.weights, MODEL_FILES.weights_index)
MAX_REACHABLE_FILES = 10_000


def check_model_folder(folder: Path) -> None:
    """Refuse a local model folder that names code to import beyond :data:`STAGE_CLASSES`.

    Raises:
        ModelLoadError: naming the file and the entry (a stage type, ``activation_function``,
            ``auto_map``, pickled weights).
    """
    for stage in _stages(folder):
        kind = stage.get("type")
        if kind not in STAGE_CLASSES:
            names = sorted({cls.__name__ for cls in STAGE_CLASSES.values()})
            raise ModelLoadError(
                f"{folder / MODEL_FILES.modules}: stage type {kind!r} is not one sbmoe loads "
                f"({', '.join(names)}); {_NO_CODE}"
            )
        stage_path = Path(str(stage.get("path", "")))
        stage_folder = folder / stage_path
        missing = not stage_folder.is_dir() and STAGE_CLASSES[kind] is not Normalize  # it has no files
        if missing or stage_path.is_absolute() or ".." in stage_path.parts:
            raise ModelLoadError(  # before: a TypeError traceback, or a folder outside the model read
                f"{folder / MODEL_FILES.modules}: stage {kind.rsplit('.', 1)[-1]} names the folder "
                f"{stage.get('path')!r}, which is not a folder inside {folder}"
            )
        if STAGE_CLASSES[kind] is Dense:
            _check_activation(stage_folder / MODEL_FILES.config)
    for file in _reachable_files(folder):
        _check_file(file)


def _check_file(file: Path) -> None:
    """Refuse ``file`` if it makes a loader import code (``auto_map``) or unpickle weights."""
    if "config" in file.name and file.suffix == ".json":
        config = _read_json(file, strict=False)
        if isinstance(config, dict) and "auto_map" in config:
            raise ModelLoadError(f"{file}: auto_map names Python code shipped with the model; {_NO_CODE}")
    # transformers and sentence-transformers read a pickle only where no safetensors file is beside it.
    if _PICKLED_WEIGHTS.fullmatch(file.name) and not any(
        (file.parent / name).exists() for name in _SAFETENSORS_WEIGHTS
    ):
        raise ModelLoadError(
            f"{file}: weights pickled by PyTorch, with no model.safetensors beside them; sbmoe loads "
            "weights only from safetensors, as unpickling can run code. Use the model's safetensors "
            "release, or convert these weights to safetensors if you trust their origin"
        )


def check_hub_repository(name: str) -> None:
    """Refuse hub repository ``name`` when loading it would unpickle weights (a folder of it holds
    ``pytorch_model.bin`` and no safetensors) or import its code, before any weights are fetched.

    The repository's file list comes from the hub, or offline from its copy in the Hugging Face
    cache (which the load would then use, so that copy is checked as a local folder is). A name
    the hub does not know passes: the load says so.
    """
    from huggingface_hub import HfApi, snapshot_download

    try:
        files = set(HfApi().list_repo_files(name))
    except Exception:  # offline, no such repository, no access: the cached copy, if any
        files = set()
    try:
        cached = Path(snapshot_download(name, local_files_only=True))
    except Exception:  # not in the cache
        cached = None
    if cached is not None:
        check_model_folder(cached)
        files |= {path.relative_to(cached).as_posix() for path in _reachable_files(cached)}
    for file in sorted(files):
        path = PurePosixPath(file)
        if _PICKLED_WEIGHTS.fullmatch(path.name) and not any(
            (path.parent / weights).as_posix() in files for weights in _SAFETENSORS_WEIGHTS
        ):
            raise ModelLoadError(
                f"{file} of hub repository {name!r}: weights pickled by PyTorch, with no "
                "model.safetensors beside them; sbmoe loads weights only from safetensors, as "
                "unpickling can run code. Use a repository that ships safetensors"
            )


def transformer_folder(folder: Path) -> Path:
    """Where the transformer of model ``folder`` lives: its Transformer stage's path, or ``folder``."""
    paths = (
        stage.get("path", "")
        for stage in _stages(folder)
        if STAGE_CLASSES.get(stage.get("type")) is Transformer
    )
    return folder / str(next(paths, ""))


def _stages(folder: Path) -> list[dict[str, Any]]:
    """The entries of ``folder``'s ``modules.json`` (none for a plain transformers folder)."""
    modules_file = folder / MODEL_FILES.modules
    if not modules_file.exists():
        return []
    modules = _read_json(modules_file, strict=True)
    if not isinstance(modules, list) or not all(isinstance(entry, dict) for entry in modules):
        raise ModelLoadError(f"{modules_file}: expected a list of stages ({{'type': ..., 'path': ...}})")
    return modules


def _check_activation(config_file: Path) -> None:
    """A Dense stage's activation is imported by name: only torch's may be named."""
    config = _read_json(config_file, strict=True) if config_file.exists() else {}
    activation = config.get("activation_function", "torch.") if isinstance(config, dict) else None
    if not isinstance(activation, str) or not activation.startswith("torch."):
        raise ModelLoadError(
            f"{config_file}: activation_function {activation!r} is not a torch class; {_NO_CODE}"
        )


def _read_json(path: Path, *, strict: bool) -> Any:
    """``path``'s JSON; unreadable: refused when ``strict``, else ``None`` (the loader reports it)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        if strict:
            raise ModelLoadError(f"{path} is not readable JSON: {first_line(error)}") from error
        return None


def _reachable_files(folder: Path) -> Iterator[Path]:
    """Every file under ``folder``, symbolic links followed, each real folder walked once."""
    walked: set[str] = set()
    count = 0
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            folders.clear()
            continue
        walked.add(real)
        count += len(files)
        if count > MAX_REACHABLE_FILES:  # e.g. a link to / inside it: before, the whole disk was walked
            raise ModelLoadError(
                f"{folder}: more than {MAX_REACHABLE_FILES:,} files are reachable from it (through "
                f"{root}); a model folder holds a few dozen: is a link in it pointing too high?"
            )
        yield from (Path(root) / name for name in files)
