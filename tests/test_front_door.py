"""The front door: ``import sbmoe`` gives the names a user needs, each imported only when first used."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

import sbmoe


@pytest.mark.parametrize("name", sorted(sbmoe._EXPORTS))
def test_every_front_door_name_is_the_object_its_module_defines(name):
    module, attribute = sbmoe._EXPORTS[name]
    assert getattr(sbmoe, name) is getattr(importlib.import_module(module), attribute)
    assert name in dir(sbmoe)


def test_the_verbs_are_functions_not_the_subpackages_of_the_same_stem():
    assert all(callable(getattr(sbmoe, verb)) for verb in ("train", "evaluate", "index", "search", "serve"))


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Retreiver'"):
        sbmoe.Retreiver  # noqa: B018


def test_importing_sbmoe_and_building_the_cli_import_no_heavy_library():
    code = (
        "import sys, sbmoe; from sbmoe.cli.main import build_parser; build_parser();"
        "print(sorted(m for m in ('torch', 'transformers', 'faiss', 'numpy') if m in sys.modules))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_what_static_tools_see_is_what_the_front_door_serves():
    tree = ast.parse(Path(sbmoe.__file__).read_text(encoding="utf-8"))
    guarded = next(node for node in tree.body if isinstance(node, ast.If))  # if TYPE_CHECKING:
    seen = {
        alias.asname: (node.module, alias.name)
        for node in guarded.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
    }
    assert seen == sbmoe._EXPORTS


def test_every_front_door_name_is_on_the_python_api_page():
    page = (Path(__file__).resolve().parents[1] / "docs" / "python-api.md").read_text(encoding="utf-8")
    assert [name for name in sbmoe._EXPORTS if f"`{name}`" not in page] == []
