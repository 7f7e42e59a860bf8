"""The package's shape, pinned: no import cycle inside ``qwen2vl/``, no function over 80 lines, and a docstring
on every module saying what it owns. Read from the source with ``ast``, so nothing is imported or run.

Every import counts, at module level or inside a function (a lazy import is still a dependency), except those
under ``if TYPE_CHECKING:``, which exist for annotations only."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "qwen2vl"
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file in the package."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list[str]:
    """The package modules an import statement names (module-level or inside a function: both count).

    ``from .media import image`` inside ``qwen2vl/processor.py`` names ``qwen2vl.media`` and, because ``image`` is
    a module of it, ``qwen2vl.media.image``; ``from ..errors import X`` names ``qwen2vl.errors``."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in MODULES]
    if node.level:
        base = module.split(".")
        base = base[: len(base) - node.level + (1 if is_package else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    found = [target] if target in MODULES else []
    found += [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    return found


def _graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
                node.body = []  # imports for annotations only: not a dependency at run time
        deps = set()
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps.update(_resolve(name, node, path.name == "__init__.py"))
        # a module importing its own package's __init__ (or a parent package) is not a cycle we care about
        graph[name] = {d for d in deps if d != name and not name.startswith(d + ".")}
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_functions_are_short(name):
    tree = ast.parse(MODULES[name].read_text(encoding="utf-8"))
    long = [f"{n.name} ({n.end_lineno - n.lineno + 1} lines, line {n.lineno})" for n in ast.walk(tree)
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{name}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_says_what_it_owns(name):
    doc = ast.get_docstring(ast.parse(MODULES[name].read_text(encoding="utf-8")))
    assert doc and len(doc.split()) >= 4, f"{name} has no docstring saying what it owns"


def test_engine_and_processor_do_not_import_the_model():
    """Preprocessing is pure data, and the engine takes the model it is given: neither imports model.py."""
    graph = _graph()
    offenders = [m for m in graph if (m == "qwen2vl.processor" or m.startswith("qwen2vl.engine"))
                 and "qwen2vl.model" in graph[m]]
    assert not offenders, f"import qwen2vl.model: {offenders}"


def test_readme_file_map_lists_every_module():
    readme = (ROOT.parent / "README.md").read_text(encoding="utf-8")
    missing = [str(p.relative_to(ROOT.parent)) for p in MODULES.values()
               if f"`{p.relative_to(ROOT.parent).as_posix()}`" not in readme]
    assert not missing, f"README's file map lacks: {missing}"
