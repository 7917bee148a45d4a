"""The errors sbmoe raises for problems a user can fix: bad data, settings, models, indexes, paths.

The command line prints these in one line and exits with code 2; any other exception is a bug and
keeps its traceback. Each class also derives from the built-in it replaces, so
``except ValueError`` keeps working for Python callers.
"""

from __future__ import annotations


class SbmoeError(Exception):
    """A problem with what the user gave sbmoe (not a bug in sbmoe)."""


class UsageError(SbmoeError, ValueError):
    """A setting, option or argument that cannot be used as given."""


class DataError(SbmoeError, ValueError):
    """A collection is missing, malformed or cannot be obtained; the message says where and why."""


class MissingInputError(SbmoeError, FileNotFoundError):
    """A file or directory the user named (collection, index, model, grid) does not exist."""


class ModelLoadError(SbmoeError, RuntimeError):
    """A backbone or saved model could not be found or loaded."""


class HubError(SbmoeError, RuntimeError):
    """The Hugging Face Hub could not be reached, or refused a request (token, repository)."""


class TrainingDivergedError(SbmoeError, FloatingPointError):
    """The training loss became non-finite: the settings (usually a learning rate) make it diverge."""


class DiskFullError(SbmoeError, OSError):
    """A write ran out of space (or quota) on its file system; nothing half-written is kept as done."""


class DataWarning(UserWarning):
    """Something in a collection was skipped, or adjusted, without making it unusable."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its class name when it has none (for one-line errors)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
