"""The package's layers: each subpackage imports only from the ones below it, and nothing forms a circle.

The order, lowest first, is :data:`LAYERS`; a module may import its own package and any package
listed before it, at module level or inside functions alike. ``sbmoe.moe_head`` and
``sbmoe.adapters`` are aliases that keep models saved by 0.1.0 loading (``tests/test_saved_models.py``).
The file names of every kind of artifact are spelled once, in :mod:`sbmoe.core.layouts`: every other
module takes them from there.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import sbmoe
from sbmoe.core import layouts

PACKAGE = Path(sbmoe.__file__).parent
LAYERS = (
    "core",
    "config",
    "data",
    "model",
    "inference",
    "retrieval",
    "evaluation",
    "training",
    "study",
    "serving",
    "cli",
)
LEGACY_ALIASES = {"moe_head": "model", "adapters": "model"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """The sbmoe modules ``path`` imports (``from sbmoe.x import y`` counts ``sbmoe.x.y`` if it is one)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sbmoe":
            found.add(node.module)
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if (PACKAGE.parent / Path(*submodule.split("."))).with_suffix(".py").exists():
                    found.add(submodule)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "sbmoe")
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the sbmoe modules it imports.

    The front door (``sbmoe/__init__.py``) is left out: it sits above every layer, names their public
    objects and imports each only when a user first asks for it (``tests/test_front_door.py``).
    """
    return {
        module_name(path): imported_modules(path) - {module_name(path)}
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != PACKAGE / "__init__.py"
    }


def package_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] == "__main__":
        return None  # the top-level package (its version) and `python -m sbmoe`: above every layer
    return LEGACY_ALIASES.get(parts[1], parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    wrong = []
    for module, targets in graph.items():
        here = package_of(module)
        for target in targets:
            there = package_of(target)
            if here is None or there is None or there == here:
                continue
            if LAYERS.index(there) > LAYERS.index(here):
                wrong.append(f"{module} imports {target} ({there} is above {here})")
    return sorted(wrong)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*stack[stack.index(target) :], target]
            if target not in state and (cycle := visit(target)):
                return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_every_subpackage_has_a_layer_and_a_docstring():
    packages = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))
    assert sorted(LAYERS) == packages
    for name in packages:
        docstring = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text(encoding="utf-8")))
        assert docstring and len(docstring.split()) >= 15, f"sbmoe.{name} needs a one-paragraph docstring"
    top_level = sorted(p.stem for p in PACKAGE.glob("*.py") if p.stem not in ("__init__", "__main__"))
    assert top_level == sorted(LEGACY_ALIASES)


def test_no_package_imports_one_above_it():
    graph = import_graph()
    assert "sbmoe.cli.main" in graph and "sbmoe.training.trainer" in graph  # the scan sees the package
    assert upward_imports(graph) == []


def test_upward_imports_are_found():
    graph = {"sbmoe.core.io": {"sbmoe.training.trainer"}, "sbmoe.cli.main": {"sbmoe.core.io"}}
    assert upward_imports(graph) == ["sbmoe.core.io imports sbmoe.training.trainer (training is above core)"]


def test_no_import_circle_between_modules_or_packages():
    graph = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])
    packages: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if package_of(module):
            packages.setdefault(package_of(module), set()).update(
                t for t in map(package_of, targets) if t and t != package_of(module)
            )
    assert find_cycle(packages) is None, " -> ".join(find_cycle(packages) or [])


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_the_core_and_config_import_no_heavy_package():
    """``sbmoe --help`` and config handling must not pay for torch: core's light modules and config."""
    light = [
        *PACKAGE.glob("config/*.py"),
        *(PACKAGE / "core" / f"{n}.py" for n in ("errors", "io", "choices")),
    ]
    for path in light:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        top = {
            alias.name.split(".")[0]
            for node in tree.body
            if isinstance(node, ast.Import | ast.ImportFrom)
            for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])
        }
        assert not top & {"torch", "numpy", "transformers", "faiss"}, path


def declared_file_names() -> dict[str, str]:
    """Each file name :mod:`sbmoe.core.layouts` declares, and the kind declaring it (folders and
    suffixes, such as ``training`` or ``.png``, are ordinary words and not checked)."""
    names: dict[str, str] = {}
    for files in layouts.LAYOUTS:
        for field in dataclasses.fields(files):
            value = getattr(files, field.name)
            if isinstance(value, str) and "." in value.strip("."):
                names.setdefault(value, type(files).__name__)
    return names


def spelled_file_names(source: str, names: dict[str, str]) -> list[str]:
    """The string constants of ``source`` (f-strings' parts included) that spell one of ``names``,
    alone or as a path's last part (``training/config.json``)."""
    return [
        f"line {node.lineno}: {node.value!r} (declared by {names[name]})"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
        for name in names
        if node.value == name or node.value.endswith(f"/{name}")
    ]


def test_every_artifact_file_name_is_spelled_only_where_it_is_declared():
    names = declared_file_names()
    assert {"sbmoe.json", "modules.json", "meta.json", "log.jsonl", "tables.md"} <= set(names)
    declaring = PACKAGE / "core" / "layouts.py"
    spelled = {
        module_name(path): found
        for path in sorted(PACKAGE.rglob("*.py"))
        if path != declaring and (found := spelled_file_names(path.read_text(encoding="utf-8"), names))
    }
    assert spelled == {}, "take these names from sbmoe.core.layouts"


def test_spelled_file_names_are_found():
    names = {"meta.json": "IndexFiles", "config.json": "ModelFiles"}
    source = "\n".join(
        ['a = "meta.json"', 'b = path / "training/config.json"', "c = f\"{d / 'config.json'}\"", 'e = "meta"']
    )
    assert spelled_file_names(source, names) == [
        "line 1: 'meta.json' (declared by IndexFiles)",
        "line 2: 'training/config.json' (declared by ModelFiles)",
        "line 3: 'config.json' (declared by ModelFiles)",
    ]


MAX_PARAMETERS = 6


def parameter_count(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Parameters a caller can pass (``self``/``cls`` excluded; ``*args`` and ``**kwargs`` one each)."""
    arguments = function.args
    named = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    count = len([a for a in named if a.arg not in ("self", "cls")])
    return count + (arguments.vararg is not None) + (arguments.kwarg is not None)


def public_functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """Module-level functions and public classes' methods (constructors included) a user may call."""
    functions = ast.FunctionDef | ast.AsyncFunctionDef
    for node in tree.body:
        if isinstance(node, functions) and not node.name.startswith("_"):
            yield node.name, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for member in node.body:
                if isinstance(member, functions) and (
                    member.name == "__init__" or not member.name.startswith("_")
                ):
                    yield f"{node.name}.{member.name}", member


def too_many_parameters(source: str) -> list[str]:
    return [
        f"{name} takes {parameter_count(function)}"
        for name, function in public_functions(ast.parse(source))
        if parameter_count(function) > MAX_PARAMETERS
    ]


def test_no_public_function_takes_more_than_six_parameters():
    """Jobs take objects (a config, ``JobOptions``), not long lists of loose settings."""
    wrong = [
        f"{module_name(path)}.{found}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for found in too_many_parameters(path.read_text(encoding="utf-8"))
    ]
    assert wrong == []


def test_parameters_are_counted_as_a_caller_passes_them():
    source = (
        "def f(a, b, /, c, d, *args, e, **kwargs): ...\n"
        "def _private(a, b, c, d, e, f, g): ...\n"
        "class C:\n"
        "    def __init__(self, a, b, c, d, e, f, g): ...\n"
        "    def fine(self, a, b, c, d, e, f): ...\n"
        "    @classmethod\n"
        "    def build(cls, a, b, c, d, e, f, g=1): ...\n"
    )
    assert too_many_parameters(source) == ["f takes 7", "C.__init__ takes 7", "C.build takes 7"]
