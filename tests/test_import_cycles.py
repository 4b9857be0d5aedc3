"""The import graph of ``histoscope`` has no cycles in the packages that must stay layered.

The graph is read from the source (no module is imported): every
``import histoscope...`` and ``from histoscope... import ...`` at module or
function level is an edge; imports under ``if TYPE_CHECKING:`` are not.
``from histoscope.x import name`` points at the module ``histoscope.x.name``
when there is one, else at ``histoscope.x``. Importing a submodule is not
counted as importing its package's ``__init__``, so a package re-exporting its
submodules is no cycle; a submodule importing names from its own package is.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
#: Packages whose modules must form an acyclic graph among themselves.
LAYERED = ("histoscope.slide", "histoscope.training")

Graph = dict[str, set[str]]


def _module_names(root: Path, top: str) -> dict[str, Path]:
    out = {}
    for f in sorted((root / top).rglob("*.py")):
        parts = f.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(node: ast.AST) -> Iterator[ast.AST]:
    """Every node below ``node``, skipping the bodies of ``if TYPE_CHECKING:``."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def _targets(node: ast.AST, module: str, is_pkg: bool, modules: set[str]) -> Iterator[str]:
    def existing(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    if isinstance(node, ast.Import):
        for alias in node.names:
            yield existing(alias.name)
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative: resolve against this module's package
            pkg = module if is_pkg else module.rpartition(".")[0]
            for _ in range(node.level - 1):
                pkg = pkg.rpartition(".")[0]
            base = f"{pkg}.{base}" if base else pkg
        for alias in node.names:
            full = f"{base}.{alias.name}"
            yield full if full in modules else existing(base)


def import_graph(root: Path = SRC, top: str = "histoscope") -> Graph:
    """``module -> modules it imports`` for every module of package ``top`` under ``root``."""
    files = _module_names(root, top)
    modules = set(files)
    graph: Graph = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        is_pkg = path.name == "__init__.py"
        graph[name] = {
            t
            for node in _runtime_nodes(tree)
            for t in _targets(node, name, is_pkg, modules)
            if t is not None and t != name
        }
    return graph


def cycles(graph: Graph) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _within(graph: Graph, prefixes: tuple[str, ...]) -> Graph:
    def inside(m: str) -> bool:
        return any(m == p or m.startswith(p + ".") for p in prefixes)

    return {m: {t for t in ts if inside(t)} for m, ts in graph.items() if inside(m)}


def test_layered_packages_have_no_import_cycles():
    graph = import_graph()
    assert "histoscope.slide._slide" in graph and "histoscope.training.isight" in graph
    found = cycles(_within(graph, LAYERED))
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_graph_sees_function_level_and_package_imports_but_not_type_checking(tmp_path):
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    files = {
        "__init__.py": "from demo.a import f\n",
        "a.py": "def f():\n    from demo.b import g\n    return g\n",
        "b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from demo import a\n",
        "sub/__init__.py": "from .x import X\n",
        "sub/x.py": "from demo.sub import helper\nX = 1\n",
        "sub/helper.py": "from demo import sub\n",
        "sub/y.py": "import demo.sub.x\nfrom . import z\n",
        "sub/z.py": "def h():\n    from ..sub import y\n",
    }
    for name, text in files.items():
        (pkg / name).write_text(text)
    graph = import_graph(tmp_path, "demo")
    assert graph["demo"] == {"demo.a"}
    assert graph["demo.a"] == {"demo.b"}
    assert graph["demo.b"] == set()
    assert graph["demo.sub.x"] == {"demo.sub.helper"}
    assert cycles(graph) == [
        ["demo.sub", "demo.sub.helper", "demo.sub.x"],
        ["demo.sub.y", "demo.sub.z"],
    ]
