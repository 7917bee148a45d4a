"""What every config shares: saving and loading itself (:class:`ConfigBase`), building one from a dict
with type checks (tolerant of unknown keys), and checking declared choices.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
import warnings
from typing import Any, Literal, TypeVar

from sbmoe.core.errors import MissingInputError, UsageError

ConfigT = TypeVar("ConfigT")
SelfT = TypeVar("SelfT", bound="ConfigBase")


class ConfigBase:
    """The base of every config dataclass: ``to_dict`` / ``save`` / ``load`` (a JSON file).

    ``load`` and :meth:`from_dict` tolerate keys a newer (or older) version wrote: they are named in a
    warning and ignored, and renamed keys (a class's ``RENAMED``) are mapped to today's names.
    """

    def to_dict(self) -> dict[str, Any]:
        """The fields as plain JSON-ready values (a deep copy)."""
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    @classmethod
    def from_dict(cls: type[SelfT], data: dict[str, Any], *, source: str = "config") -> SelfT:
        """Build the config from ``data`` (see :func:`from_dict`)."""
        return from_dict(cls, data, source=source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config to ``path`` as JSON, atomically."""
        from sbmoe.core.io import write_json  # not at import: `sbmoe --help` reads configs only

        write_json(path, self.to_dict())

    @classmethod
    def load(cls: type[SelfT], path: str | os.PathLike) -> SelfT:
        """Read a config :meth:`save` wrote.

        Raises:
            MissingInputError: ``path`` does not exist.
            UsageError: it is not a JSON object of this config's fields with their types.
        """
        from sbmoe.core.io import read_json

        if not os.path.isfile(path):
            raise MissingInputError(f"{path}: no such config file")
        try:
            data = read_json(path)
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise UsageError(f"{path}: not a readable JSON config ({error})") from error
        if not isinstance(data, dict):
            raise UsageError(f"{path}: expected a JSON object of {cls.__name__} fields")
        return from_dict(cls, data, source=str(path))


def from_dict(cls: type[ConfigT], data: dict[str, Any], *, source: str = "config") -> ConfigT:
    """Build ``cls`` from ``data``, warning about (and ignoring) keys it does not know."""
    renamed = getattr(cls, "RENAMED", {})
    data = {renamed.get(key, key): value for key, value in data.items()}
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        warnings.warn(f"{source}: ignoring unknown {cls.__name__} keys {unknown}", stacklevel=2)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key in known and not _has_type(value, hints[key]):
            raise UsageError(f"{source}: {key} must be {_type_name(hints[key])}, got {value!r}")
    return cls(**{key: value for key, value in data.items() if key in known})


def _has_type(value: Any, hint: Any) -> bool:
    """Whether a JSON/YAML value fits a config field's type (ints count as floats, bools as nothing else)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, option) for option in typing.get_args(hint))
    if hint is type(None):
        return value is None
    if origin is Literal:
        return value in typing.get_args(hint)
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, typing.get_args(hint)[0]) for v in value)
    if hint is bool:
        return isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _type_name(hint: Any) -> str:
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(map(repr, typing.get_args(hint)))
    return str(hint).replace("typing.", "").replace("<class '", "").replace("'>", "")


def check_choices(config: Any) -> None:
    """Raise ``UsageError`` for the first field whose value is not among its declared choices."""
    for item in dataclasses.fields(config):
        choices = item.metadata.get("choices")
        value = getattr(config, item.name)
        values = value if isinstance(value, list) else [value]
        if choices and any(v is not None and v not in choices for v in values):
            raise UsageError(f"{item.name} must be one of {list(choices)}, got {value!r}")


def check_at_least(config: Any, minimum: int, *names: str) -> None:
    """Raise ``UsageError`` for the first of the fields ``names`` that is set and below ``minimum``."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise UsageError(f"{name} must be >= {minimum}, got {value}")
