"""What every config shares: building one from a dict with type checks (tolerant of unknown keys), and
checking declared choices.
"""

from __future__ import annotations

import dataclasses
import types
import typing
import warnings
from typing import Any, Literal, TypeVar

from sbmoe.core.errors import UsageError

ConfigT = TypeVar("ConfigT")


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
