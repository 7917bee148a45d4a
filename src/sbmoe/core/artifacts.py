"""Output paths: what an existing output is, whether a job may write over it, and one writer at a time.

The rule every job follows: no command deletes or replaces something it did not create. A job may
write over an existing output only when it is the same kind of sbmoe artifact (an index over an
index, a training run over a training run, an evaluation over an evaluation), and only with
``overwrite`` when it was made with other settings. Anything else is refused with a
:class:`~sbmoe.core.errors.UsageError` naming the path, before any expensive work.

While a job writes an output it holds a lock file beside it (``.NAME.lock``: pid and host, held
with ``flock`` so a killed process releases it). A second writer is refused; a lock left by a dead
process is taken over with a warning, and the temporaries its interrupted writes left behind
(``.NAME.*.tmp``, ``.NAME.old``) are removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from sbmoe.core.errors import DiskFullError, UsageError
from sbmoe.core.io import naming_a_full_disk
from sbmoe.core.layouts import (
    EVALUATION,
    EVALUATION_FILES,
    EXPERIMENT,
    EXPERIMENT_FILES,
    INDEX,
    INDEX_FILES,
    MODEL,
    MODEL_FILES,
    REPORT,
    REPORT_FILES,
    SHARDED_INDEX,
    SHARDED_INDEX_FILES,
    TEMPORARY,
    TRAINING_FILES,
    TRAINING_RUN,
    entries,
)

logger = logging.getLogger(__name__)

# A plain file (a search's TREC run): a file may replace a file, never a directory.
FILE = "file"

# What each kind is, for messages.
_DESCRIPTIONS = {
    "file": "is a file",
    "foreign": "is a non-empty directory that sbmoe did not write",
    INDEX: "holds an sbmoe index",
    SHARDED_INDEX: "holds a sharded sbmoe index",
    TRAINING_RUN: "holds an sbmoe training run (a trained model and its training/ folder)",
    MODEL: "holds a model",
    EVALUATION: "holds an sbmoe evaluation",
    EXPERIMENT: "holds an sbmoe experiment",
    REPORT: "holds an sbmoe report",
}
# Each kind's folder, in the order they are told apart: the first that recognises a folder names it.
_RECOGNISED = (
    (INDEX, INDEX_FILES),
    (TRAINING_RUN, TRAINING_FILES),
    (MODEL, MODEL_FILES),
    (REPORT, REPORT_FILES),
    (EXPERIMENT, EXPERIMENT_FILES),
    (SHARDED_INDEX, SHARDED_INDEX_FILES),
    (EVALUATION, EVALUATION_FILES),
)
# The files an artifact of each kind writes into its folder (folders of its parts: see _PARTS).
_OWN_FILES = {INDEX: INDEX_FILES.own, EVALUATION: EVALUATION_FILES.own}
# Sub-folders an artifact is made of, and their kind: a sharded index's shards, an evaluation's rules.
_PARTS = {SHARDED_INDEX: INDEX, EVALUATION: EVALUATION}


def artifact_kind(path: str | os.PathLike) -> str | None:
    """What ``path`` holds: ``None`` (nothing: missing or an empty directory), one of the sbmoe kinds
    (:data:`INDEX`, :data:`SHARDED_INDEX`, :data:`TRAINING_RUN`, :data:`MODEL`, :data:`EVALUATION`,
    :data:`EXPERIMENT`, :data:`REPORT`), ``"file"`` or ``"foreign"`` (a directory sbmoe did not write)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    if not path.is_dir():
        return "file"
    if not entries(path):
        return None
    return next((kind for kind, files in _RECOGNISED if files.recognises(path)), "foreign")


def owns(kind: str, entry: Path) -> bool:
    """Whether ``entry``, in the folder of a ``kind`` artifact, is the artifact's own (else a user's)."""
    if kind in _PARTS and entry.is_dir() and not entry.is_symlink():
        if kind == SHARDED_INDEX:
            return bool(SHARDED_INDEX_FILES.shard.match(entry.name))
        return EVALUATION_FILES.is_one(entry)
    return entry.name in _OWN_FILES.get(kind, ()) and not entry.is_dir()


def remove_own_entries(path: str | os.PathLike, kind: str) -> None:
    """Remove what the ``kind`` artifact at ``path`` owns (:func:`owns`); whatever else is there stays."""
    for entry in Path(path).iterdir():
        if not owns(kind, entry):
            continue
        if entry.is_dir():
            remove_own_entries(entry, _PARTS[kind])
            with contextlib.suppress(OSError):  # it still holds a user's files
                entry.rmdir()
        else:
            entry.unlink()


def index_settings(fingerprint: str | None, collection: str | None, index_config: Any) -> dict[str, Any]:
    """What makes two indexes the same: the model's fingerprint, the collection and the index config."""
    return {"fingerprint": fingerprint, "collection": collection, "index_config": _plain(index_config)}


def training_settings(model_config: Any, train_config: Any, data: str | None) -> dict[str, Any]:
    """What makes two training runs the same: the model and training configs and the data's name."""
    return {"model_config": _plain(model_config), "train_config": _plain(train_config), "data": data}


def evaluation_settings(
    model_fingerprint: str | None, evaluate_config: Any, data: str | None
) -> dict[str, Any]:
    """What makes two evaluations the same: the model's fingerprint, the evaluate config and the data."""
    return {
        "model_fingerprint": model_fingerprint,
        "evaluate_config": _plain(evaluate_config),
        "data": data,
    }


def _plain(config: Any) -> Any:
    """A config (anything with ``to_dict``, see :class:`sbmoe.config.base.ConfigBase`) as its dict."""
    return config.to_dict() if hasattr(config, "to_dict") else config


def recorded_settings(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The settings an existing artifact of ``kind`` at ``path`` was made with (empty: not recorded).

    Built by the same functions the jobs build the new artifact's settings with
    (:func:`index_settings`, :func:`training_settings`, :func:`evaluation_settings`), so the two
    compare key by key by construction.
    """
    path = Path(path)
    if kind == INDEX:
        meta = _read_settings_file(path / INDEX_FILES.meta)
        extra = meta.get("metadata") or {}
        return meta and index_settings(
            meta.get("fingerprint"), extra.get("collection"), extra.get("index_config")
        )
    if kind == TRAINING_RUN:
        saved = _read_settings_file(path / TRAINING_FILES.folder / TRAINING_FILES.config)
        return saved and training_settings(
            saved.get("model_config"), saved.get("train_config"), (saved.get("data") or {}).get("name")
        )
    if kind == EVALUATION:
        files = [path / EVALUATION_FILES.config, *sorted(path.glob(f"*/{EVALUATION_FILES.config}"))]
        saved = _read_settings_file(next(file for file in files if file.is_file()))
        return saved and evaluation_settings(
            saved.get("model_fingerprint"),
            saved.get("evaluate_config"),
            (saved.get("data") or {}).get("name"),
        )
    return {}


def _read_settings_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(
            f"{path} is unreadable ({error}); move the folder aside or choose another --output"
        ) from error
    return data if isinstance(data, dict) else {}


def setting_differences(before: Mapping[str, Any], after: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``name old -> new`` for every (nested) key of ``after`` whose value differs in ``before``."""
    changes = []
    for key, new in after.items():
        old = before.get(key)
        if isinstance(new, Mapping) and isinstance(old, Mapping):
            changes += setting_differences(old, new, f"{prefix}{key}.")
        elif old != new:
            changes.append(f"{prefix}{key} {old!r} -> {new!r}")
    return changes


def check_output(
    path: str | os.PathLike,
    kind: str | tuple[str, ...],
    settings: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    flag: str = "--output",
) -> bool:
    """Refuse to write a ``kind`` artifact at ``path`` unless that is safe.

    Args:
        path: The output.
        kind: What the job writes there (a tuple: any of those kinds, the first for new outputs).
        settings: What the new artifact is made with (keys as :func:`recorded_settings`'); ``None``
            checks the kind only.
        overwrite: Allow replacing an artifact of ``kind`` made with other settings.
        flag: The option that named ``path``, for messages.

    Returns:
        Whether an existing artifact made with other settings will be replaced (under ``overwrite``).

    Raises:
        UsageError: ``path`` holds something else than a ``kind`` artifact, or one made with other
            settings and ``overwrite`` is off.
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else kind
    if FILE in kinds and path.is_dir():
        raise UsageError(f"{flag} {path} is a directory; this job writes a file there: name a file")
    found = artifact_kind(path)
    if found is None:
        return False
    if found not in kinds:
        raise UsageError(
            f"{flag} {path} {_DESCRIPTIONS[found]}; sbmoe writes {_a(kinds[0])} only where there is "
            f"nothing or an earlier {kinds[0]}, so nothing was changed: choose another {flag}"
        )
    kind = found
    recorded = recorded_settings(path, kind) if settings else {}
    if not recorded:  # nothing to compare with: a write that died before recording its settings
        return False
    changes = setting_differences(recorded, settings)
    if changes and not overwrite:
        raise UsageError(
            f"{flag} {path} holds {_a(kind)} made with other settings ({'; '.join(changes)}); "
            f"pass --overwrite to replace it, or choose another {flag}"
        )
    return bool(changes)


def _a(kind: str) -> str:
    return f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"


def _check_place(path: Path) -> None:
    """Refuse an output that cannot be a folder's entry: the root, or a path under a file."""
    absolute = Path(os.path.abspath(path))
    if not absolute.name:
        raise UsageError(f"--output {path} is the root of the file system: name a new folder to write to")
    for parent in absolute.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                raise UsageError(f"--output {path} lies under {parent}, which is not a folder")
            return


def lock_path(path: str | os.PathLike, role: str = "") -> Path:
    """The lock file of the output ``path`` (beside it, so it survives the output's replacement).

    ``role`` names one of several writers that share the output (``worker-0-of-2``): each holds its own.
    """
    path = Path(path).absolute()
    return path.with_name(f".{path.name}.{role}.lock" if role else f".{path.name}.lock")


@contextlib.contextmanager
def output_lock(path: str | os.PathLike, role: str = "") -> Iterator[None]:
    """Hold the lock of the output ``path`` (``role``'s, see :func:`lock_path`) for the block.

    Raises:
        UsageError: another live process holds the lock, or the place of ``path`` is not writable.
    """
    path = Path(path)
    _check_place(path)
    lock = lock_path(path, role)
    try:
        with naming_a_full_disk(path):
            lock.parent.mkdir(parents=True, exist_ok=True)
            handle = _acquire(lock, path)
    except DiskFullError:
        raise
    except OSError as error:
        raise UsageError(f"cannot write {path}: {error.strerror or error} ({lock.parent})") from error
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        handle.close()  # releases the flock


def _acquire(lock: Path, path: Path) -> Any:
    """Open and flock ``lock``; refuse when a live process holds it, take over a dead one's."""
    while True:
        handle = open(lock, "a+", encoding="utf-8")  # noqa: SIM115 (held until the block ends)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = _owner(handle)
            handle.close()
            raise UsageError(
                f"{path} is being written by another sbmoe process ({owner}; lock {lock}); wait for it "
                f"to finish, or choose another output"
            ) from None
        # Another process may have removed the file between our open and our flock: lock the new one.
        if lock.exists() and os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
            break
        handle.close()
    previous = _owner(handle)
    this_host = socket.gethostname()
    if previous:
        try:
            recorded = json.loads(previous)
        except json.JSONDecodeError:
            recorded = {}
        if isinstance(recorded, dict) and recorded.get("host") not in (None, this_host):
            handle.close()
            raise UsageError(
                f"{path} is locked by pid {recorded.get('pid')} on host {recorded['host']} (lock {lock}); "
                f"if that process is gone, delete the lock file"
            )
        logger.warning("taking over the stale lock of %s left by a dead process (%s)", path, previous)
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": this_host}))
        handle.flush()
    except OSError:  # no room to record the owner: leave no empty lock file behind
        lock.unlink(missing_ok=True)
        handle.close()
        raise
    return handle


def _owner(handle: Any) -> str:
    handle.seek(0)
    return handle.read().strip()


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove what interrupted writes of the output ``path`` left (call it holding the output's lock).

    That is: ``.NAME.<random>.tmp`` beside ``path``, temporaries inside ``path`` and its
    sub-folders (``.model.*.tmp``, ``training/.checkpoint.*.tmp``, ``.metrics.json.*.tmp``, ...), and
    an ``.X.old`` copy whose ``X`` is back in place.

    Returns:
        What was removed (each also logged as a warning).
    """
    path = Path(path)
    prefix = f".{path.name}."
    stale = [
        entry
        for entry in path.parent.iterdir()
        if entry.name.startswith(prefix) and TEMPORARY.match(entry.name)
    ]
    old = path.with_name(f".{path.name}.old")
    if old.exists() and path.exists():
        stale.append(old)
    if path.is_dir() and not path.is_symlink():
        folders = [path, *(entry for entry in path.iterdir() if entry.is_dir() and not entry.is_symlink())]
        for folder in folders:
            for entry in folder.iterdir():
                original = entry.with_name(entry.name[1:-4]) if entry.name.endswith(".old") else None
                if TEMPORARY.match(entry.name) or (
                    original is not None and entry.name.startswith(".") and original.exists()
                ):
                    stale.append(entry)
    for entry in stale:
        logger.warning("removing %s, left by an interrupted write", entry)
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return stale


@contextlib.contextmanager
def writing_output(
    path: str | os.PathLike,
    kind: str | tuple[str, ...],
    settings: Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    within: str | None = None,
    role: str = "",
) -> Iterator[bool]:
    """The one gate every job that writes opens its output through: lock, check, clean, once.

    Locks ``path`` for the whole write, :func:`check_output` s it (the kind, and with ``settings``
    whether an earlier artifact was made otherwise, refused unless ``overwrite``), then removes the
    temporaries an interrupted earlier write left.

    Args:
        path: The output.
        kind: What the job writes (see :func:`check_output`).
        settings: What it is made with (:func:`index_settings`, :func:`training_settings`,
            :func:`evaluation_settings`); ``None`` checks the kind only.
        overwrite: Allow replacing a ``kind`` made with other settings.
        within: The kind the folder holding ``path`` must be (a shard: :data:`SHARDED_INDEX`).
        role: For outputs several processes write at once, this writer's lock (:func:`lock_path`).

    Yields:
        Whether an existing ``kind`` made with other settings is being replaced (``overwrite``).

    Raises:
        UsageError: another process writes ``path``, or what is there may not be replaced.
    """
    with output_lock(path, role):
        if within is not None:
            check_output(Path(path).parent, within)
        replacing = check_output(path, kind, settings, overwrite=overwrite)
        if not role:  # a shared output's temporaries may be another writer's, in progress
            remove_stale_temporaries(path)
        with naming_a_full_disk(path):
            yield replacing
