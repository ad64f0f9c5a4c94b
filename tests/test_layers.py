"""The package's rooms: the import contract (pyproject's [tool.importlinter], checked by
import-linter in CI) layers every folder of the package, the root holds only the public face,
no two modules share a name, none is longer than a newcomer reads at one sitting, and no import,
however late, closes a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support import source_trees

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_FACE = {"__init__", "optimizer", "client", "errors"}
MAX_LINES = 410  # "under about 400 lines": one concept, read at one sitting
# The demo's objective: imported by workers, by its path, at run time; nothing imports it.
OUTSIDE_THE_LAYERS = {"examples"}


def _files() -> dict[str, Path]:
    """Every module of the package as installed (workers/ is `optuna_rq.workers`), by name."""
    found = {}
    for folder, package in (
        (ROOT / "broker", "optuna_rq"),
        (ROOT / "workers", "optuna_rq.workers"),
    ):
        for path in folder.rglob("*.py"):
            parts = [package, *path.relative_to(folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    (contract,) = [c for c in config["contracts"] if c["type"] == "layers"]
    return [name.strip() for layer in contract["layers"] for name in layer.split("|")]


def _rooms() -> set[str]:
    """The package's folders, and the modules at its root."""
    return {name.split(".")[1] for name in _files() if name.count(".") >= 1}


def test_the_layers_name_every_room_once() -> None:
    layered = [name.removeprefix("optuna_rq.") for name in _layers()]
    assert len(layered) == len(set(layered)), "a room is in two layers"
    assert set(layered) == _rooms() - OUTSIDE_THE_LAYERS


def test_the_package_root_holds_only_the_public_face() -> None:
    root = {path.stem for path in (ROOT / "broker").glob("*.py")}
    assert root == PUBLIC_FACE


def test_no_two_modules_share_a_name() -> None:
    """A module's name says what it is without its folder: none is spelled twice."""
    by_name: dict[str, list[str]] = {}
    for name, path in _files().items():
        if path.stem not in {"__init__", "__main__"}:
            by_name.setdefault(path.stem, []).append(name)
    assert {last: names for last, names in by_name.items() if len(names) > 1} == {}


def test_every_module_reads_at_one_sitting() -> None:
    lengths = {name: len(path.read_text().splitlines()) for name, path in _files().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_LINES} == {}


def _imports(name: str, path: Path, modules: set[str]) -> set[str]:
    """The package's modules `name` imports anywhere in it (late imports and TYPE_CHECKING too)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(source_trees.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from package import module` imports the module, as import-linter counts it.
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {module for module in found if module in modules and module != name}


def test_no_import_closes_a_circle() -> None:
    """Tarjan's strongly connected components over every import in the package: each is one
    module, so the modules can be read, and layered, bottom up. A package's `__init__` importing
    its own modules is not a circle with them unless one of them imports the package back."""
    files = _files()
    modules = set(files)
    graph = {name: _imports(name, path, modules) for name, path in files.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in graph[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    assert circles == []
