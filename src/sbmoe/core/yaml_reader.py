"""Reading a YAML file a user wrote: safe types only, no key given twice, bounded size.

``yaml.safe_load`` builds no objects beyond plain data, but keeps the last of two equal keys
silently and lets a few aliases stand for billions of values (a "billion laughs" document, which
takes little memory to load and forever to walk). :func:`read_yaml` refuses both, and anything
larger than a grid file needs to be, in one line naming the file.
"""

from __future__ import annotations

import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from sbmoe.core.errors import UsageError

MAX_YAML_BYTES = 1 << 20
# Values (scalars, lists, mappings) once every alias is expanded; a grid holds a few hundred.
MAX_YAML_VALUES = 100_000


class _StrictLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # refused by construct_mapping itself
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> Any:
    """The data of the YAML file ``path``.

    Raises:
        UsageError: naming ``path``: unreadable, not YAML, a key given twice, over
            :data:`MAX_YAML_BYTES`, or aliases that expand past :data:`MAX_YAML_VALUES` values or
            refer to themselves.
    """
    path = Path(path)
    try:
        if path.stat().st_size > MAX_YAML_BYTES:
            raise UsageError(f"{path}: larger than {MAX_YAML_BYTES >> 20} MiB; not a settings file")
        loader = _StrictLoader(path.read_text(encoding="utf-8"))
        try:
            node = loader.get_single_node()
            if node is not None:
                _check_expanded_size(node, path)
            return None if node is None else loader.construct_document(node)
        finally:
            loader.dispose()
    except RecursionError:
        raise UsageError(f"{path}: nested too deeply to be a settings file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise UsageError(f"{path}: cannot read it as YAML ({_reason(error)})") from error


def _reason(error: Exception) -> str:
    """What is wrong, and where (line and column) when YAML says."""
    mark = getattr(error, "problem_mark", None)
    if isinstance(error, yaml.MarkedYAMLError) and mark is not None:
        return f"{error.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(error).split())


def _check_expanded_size(root: yaml.Node, path: Path) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_YAML_VALUES` values or loop."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise UsageError(f"{path}: an alias refers to the value that holds it; write the value out")
        open_nodes.add(key)
        children: list[yaml.Node] = []
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [part for pair in node.value for part in pair]
        total = 1 + sum(size(child) for child in children)
        if total > MAX_YAML_VALUES:
            raise UsageError(
                f"{path}: its aliases expand to more than {MAX_YAML_VALUES:,} values; write the values out"
            )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    size(root)
