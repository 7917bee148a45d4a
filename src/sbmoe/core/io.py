"""Atomic file output (every file the toolkit writes appears whole or not at all), and where caches live."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from sbmoe.core.errors import DiskFullError

_FULL = (errno.ENOSPC, errno.EDQUOT)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file beside ``path``; rename it over ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    binary = "b" in mode
    try:
        with os.fdopen(fd, mode, encoding=None if binary else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes files private; outputs are ordinary files
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


@contextlib.contextmanager
def naming_a_full_disk(path: str | os.PathLike, flag: str = "--output") -> Iterator[None]:
    """Turn a write to ``path`` (given by ``flag``) that ran out of space into one clear error.

    Raises:
        DiskFullError: naming the file system and the path, for any error caused by ``ENOSPC`` or
            ``EDQUOT``, also as a library wraps it (safetensors, Milvus).
    """
    try:
        yield
    except DiskFullError:
        raise
    except Exception as error:
        if not _is_disk_full(error):
            raise
        raise DiskFullError(
            f"no space left on {mount_point(path)} writing {path}: free space or choose another {flag}"
        ) from error


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error``, or an error in its chain, says the disk is full (or the quota spent)."""
    texts = tuple(os.strerror(code) for code in _FULL)  # what wrappers keep of it: "No space left on device"
    while error is not None:
        if (isinstance(error, OSError) and error.errno in _FULL) or any(t in str(error) for t in texts):
            return True
        error = error.__cause__ or error.__context__
    return False


def mount_point(path: str | os.PathLike) -> Path:
    """The mount point of the file system that holds ``path`` (or would, once it is created)."""
    place = Path(os.path.abspath(path))
    while place != place.parent and not os.path.ismount(place):  # ismount: False where nothing is yet
        place = place.parent
    return place


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Write ``data`` as indented UTF-8 JSON, atomically."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, ensure_ascii=False, sort_keys=False)
        handle.write("\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def recover_directory(path: str | os.PathLike) -> None:
    """Put back ``path``'s previous copy if an :func:`atomic_directory` write died between its renames."""
    path = Path(path)
    old = path.with_name(f".{path.name}.old")
    if old.exists() and not path.exists():
        os.replace(old, path)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, keep: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` once the block succeeds.

    A previous ``path`` is kept until the new one is complete, so an interrupted write never leaves
    a half-written directory under the final name.

    Args:
        path: The directory to write.
        keep: Which entries of a previous ``path`` are not the writer's (a user's notes beside an
            index): they are carried into the new directory, unless it writes that name itself.
            They are hard-linked in before the swap, so a kill at any moment loses none of them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.old")
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if keep is not None and path.is_dir():
            _carry_entries(path, tmp, keep)
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _carry_entries(source: Path, target: Path, keep: Callable[[Path], bool]) -> None:
    """Hard-link (or, where links are refused, copy) ``source``'s ``keep`` entries into ``target``."""
    for entry in source.iterdir():
        destination = target / entry.name
        if not keep(entry) or os.path.lexists(destination):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, destination, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, destination)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    if os.path.islink(source):
        os.symlink(os.readlink(source), target)
        return
    try:
        os.link(source, target)
    except OSError:  # a file system without hard links, or a file across devices
        shutil.copy2(source, target)


def cache_root(*parts: str) -> Path:
    """Where sbmoe keeps what it can rebuild (collections, embeddings, ONNX exports), then ``parts``:
    ``$SBMOE_CACHE_DIR``, else ``~/.cache/sbmoe``."""
    root = os.environ.get("SBMOE_CACHE_DIR") or Path.home() / ".cache" / "sbmoe"
    return Path(root).expanduser().joinpath(*parts)
