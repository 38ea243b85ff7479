"""The layout shows the design: imports run one way through the layers (kernels → runtime →
router and the reference models → edge / cloud → the bench tool → the CLI), no two files import
each other across packages, and no product module is over 500 lines without saying why.

Read from the source with ``ast`` (imports inside functions and under ``TYPE_CHECKING``
count: they are arrows too); the folders come from pyproject.toml's package map."""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_LINES = 500
OVER_MARK = "(Over 500 lines:"  # a long module says why at the top of its docstring

# package → the packages it may import (besides itself); "tandem" is the top floor: the CLI and
# the demo, which may import everything
ALLOWED: dict[str, set[str]] = {
    "tandem.kernels": set(),
    "tandem.runtime": {"tandem.kernels"},
    "tandem.router": {"tandem.runtime", "tandem.kernels"},
    "tandem.reference": {"tandem.runtime", "tandem.kernels"},
    "tandem.edge": {"tandem.router", "tandem.runtime", "tandem.kernels"},
    "tandem.cloud": {"tandem.runtime", "tandem.kernels"},
    "tandem.bench": {
        "tandem.edge",
        "tandem.cloud",
        "tandem.reference",
        "tandem.router",
        "tandem.runtime",
        "tandem.kernels",
    },
}
LAYERS = sorted(ALLOWED, key=len, reverse=True)


def _modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name."""
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    out: dict[str, Path] = {}
    for pkg, folder in cfg["package-dir"].items():
        for path in (ROOT / folder).rglob("*.py"):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            name = ".".join([pkg, *parts])
            if not any(name.startswith(f"{q}.") for q in cfg["package-dir"] if len(q) > len(pkg)):
                out.setdefault(name, path)
    return out


def _package(module: str) -> str:
    return next((p for p in LAYERS if module == p or module.startswith(f"{p}.")), "tandem")


def _imports(name: str, path: Path, known: set[str]) -> Iterator[str]:
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            stem = node.module or ""
            if node.level:
                stem = ".".join(base[: len(base) - node.level + 1] + ([stem] if stem else []))
            targets = [stem] + [f"{stem}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for t in targets:
            if t in known and t != name:
                yield t


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: set(_imports(name, path, set(mods))) for name, path in mods.items()}


def test_the_package_map_finds_every_layer() -> None:
    found = {_package(m) for m in _modules()}
    assert found == {*ALLOWED, "tandem"}, found


def test_imports_run_one_way_through_the_layers() -> None:
    wrong = sorted(
        f"{a} imports {b}"
        for a, targets in _graph().items()
        for b in targets
        if (pa := _package(a)) != (pb := _package(b)) and pa != "tandem" and pb not in ALLOWED[pa]
    )
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_import_cycle_crosses_a_package() -> None:
    """Files of one package may import each other lazily (the kernels pick a device that way);
    across packages, and between files of edge, cloud or runtime's client, no cycle at all."""
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while (w := stack.pop()) != v:
                on.discard(w)
                comp.append(w)
            on.discard(v)
            if comp:
                cycles.append(sorted([v, *comp]))

    for v in graph:
        if v not in index:
            visit(v)
    allowed = [c for c in cycles if {_package(m) for m in c} == {"tandem.kernels"}]
    assert [c for c in cycles if c not in allowed] == []


def test_long_modules_say_why() -> None:
    long = []
    for name, path in _modules().items():
        text = path.read_text()
        if text.count("\n") > MAX_LINES:
            doc = ast.get_docstring(ast.parse(text)) or ""
            if OVER_MARK not in doc:
                long.append(f"{name}: {text.count(chr(10))} lines")
    assert not long, "over 500 lines, with no reason at the top:\n" + "\n".join(long)
