"""Command-line flags generated from config dataclasses: a setting is declared once, in ``config``.

Each field declared with :func:`sbmoe.config.fields.setting` becomes one flag: its name (or the field's
``flag``), type, choices, help text and default all come from the field. Flags default to ``None``
("not given"), so a verb can layer what the user gave over a preset or the dataclass defaults.
Only the standard library is imported here: ``sbmoe --help`` must answer at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Any, Literal


def flag_name(item: dataclasses.Field) -> str:
    """The flag of a config field: its declared ``flag`` or ``--`` + the name with dashes."""
    return item.metadata.get("flag") or "--" + item.name.replace("_", "-")


def add_config_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    config_class: type,
    *,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
    describe_default: Callable[[dataclasses.Field], str] | None = None,
) -> list[str]:
    """Add one flag per field of ``config_class``; returns the field names added.

    Args:
        parser: Where the flags go (a parser or an argument group).
        config_class: A dataclass whose fields carry ``help`` metadata.
        only: Add just these fields.
        skip: Leave these fields out (the verb supplies them otherwise).
        describe_default: How to word a field's default in its help (e.g. per preset); by default
            the dataclass default.
    """
    hints = typing.get_type_hints(config_class)
    added = []
    for item in dataclasses.fields(config_class):
        if (only is not None and item.name not in only) or item.name in skip or "help" not in item.metadata:
            continue
        default = describe_default(item) if describe_default else f"default: {_show(_default_of(item))}"
        options: dict[str, Any] = {
            "dest": item.name,
            "default": None,
            "help": f"{item.metadata['help']} ({default})",
        }
        base, is_list = _base_type(hints[item.name])
        if base is bool:
            options["action"] = argparse.BooleanOptionalAction
        else:
            options["type"] = base
            choices = item.metadata.get("choices") or _literal_choices(hints[item.name])
            if choices:
                options["choices"] = choices
            if item.metadata.get("metavar"):
                options["metavar"] = item.metadata["metavar"]
            if is_list:
                options["nargs"] = "+"
        parser.add_argument(flag_name(item), **options)
        added.append(item.name)
    return added


def given_values(args: argparse.Namespace, config_class: type, names: Iterable[str] | None = None) -> dict:
    """The values the user gave for ``config_class``'s fields (flags left out are absent)."""
    values = vars(args)
    wanted = set(names) if names is not None else {f.name for f in dataclasses.fields(config_class)}
    return {
        f.name: values[f.name]
        for f in dataclasses.fields(config_class)
        if f.name in wanted and values.get(f.name) is not None
    }


def preset_default_describer(presets: Mapping[str, Any], section: str) -> Callable[[dataclasses.Field], str]:
    """Word a field's default as the ``default`` preset's value, plus the other presets' where they differ."""

    def describe(item: dataclasses.Field) -> str:
        base = _default_of(item)
        parts = [f"default: {_show(base)}"]
        for name, preset in presets.items():
            value = getattr(preset, section).get(item.name, base)
            if name != "default" and value != base:
                parts.append(f"--preset {name}: {_show(value)}")
        return "; ".join(parts)

    return describe


def _default_of(item: dataclasses.Field) -> Any:
    if item.default_factory is not dataclasses.MISSING:
        return item.default_factory()
    return item.default


def _show(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) or "none"
    return str(value)


def _base_type(hint: Any) -> tuple[type, bool]:
    """The scalar type a flag parses, and whether the field is a list of it."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        origin = typing.get_origin(hint)
    if origin is list:
        return _base_type(typing.get_args(hint)[0])[0], True
    if origin is Literal:
        return type(typing.get_args(hint)[0]), False
    return hint, False


def _literal_choices(hint: Any) -> tuple | None:
    for candidate in (hint, *typing.get_args(hint)):
        if typing.get_origin(candidate) is Literal:
            return typing.get_args(candidate)
    return None
