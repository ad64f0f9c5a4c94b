"""A study's run state has one owner: no module but `dispatch/runs.py` assigns a field of a
`StudyRun`, or of the objects that hold its state for it (its spec view and its budget). Every
other module changes a run through the run's named operations.

How a write is recognized: the source of broker/ and workers/ is walked with `ast`, and every
assignment target (`=`, `+=`, annotated, inside tuples) that is an attribute whose name is a
field of one of those classes is a write to run state, whatever object it is made on: a walk
cannot know what type `x` has in `x.asked = 0`, so any object counts. The one exception is
`self.<name> = ...` inside a class body: it sets that class's own attribute, and the class cannot
be a `StudyRun` (none outside runs.py derives from one: checked below). `setattr` with a
literal field name counts too.
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from optuna_rq.dispatch import budget, run_spec, runs
from tests.support import source_trees

ROOT = Path(__file__).resolve().parents[2]
OWNER = ROOT / "broker" / "dispatch" / "runs.py"
OWNED_CLASSES = {"StudyRun": runs, "RunSpec": run_spec, "Budget": budget}
"""The classes whose fields only runs.py assigns, each with its module: a run, its spec view
(frozen: a change replaces it whole) and its budget (whose own operations assign its fields,
through `self`)."""


def _owned_fields() -> set[str]:
    """The public fields of the owned classes, read from the classes themselves."""
    names: set[str] = set()
    for class_name, module in OWNED_CLASSES.items():
        cls = getattr(module, class_name)
        names |= {f.name for f in dataclasses.fields(cls) if not f.name.startswith("_")}
    return names


def _sources() -> Iterator[Path]:
    for folder in ("broker", "workers"):
        yield from sorted((ROOT / folder).rglob("*.py"))


def _targets(node: ast.AST) -> list[ast.expr]:
    if isinstance(node, ast.Assign):
        return list(node.targets)
    if isinstance(node, ast.AugAssign | ast.AnnAssign):
        return [node.target]
    return []


def _writes(tree: ast.Module, fields: set[str]) -> Iterator[tuple[str, str]]:
    """(function's qualified name, field) for every write to an owned field in `tree`."""

    def visit(node: ast.AST, scope: list[str], in_class: bool) -> Iterator[tuple[str, str]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, [*scope, child.name], True)
                continue
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield from visit(child, [*scope, child.name], in_class)
                continue
            where = ".".join(scope) or "<module>"
            for target in _targets(child):
                for sub in ast.walk(target):
                    if not isinstance(sub, ast.Attribute) or not isinstance(sub.ctx, ast.Store):
                        continue  # `d[run.queue] = ...` reads the attribute
                    if sub.attr not in fields:
                        continue
                    own = isinstance(sub.value, ast.Name) and sub.value.id == "self"
                    if own and in_class:
                        continue  # the enclosing class's own attribute
                    yield where, sub.attr
            if (
                isinstance(child, ast.Call)
                and isinstance(child.func, ast.Name)
                and child.func.id == "setattr"
                and len(child.args) >= 2
                and isinstance(child.args[1], ast.Constant)
                and child.args[1].value in fields
            ):
                yield where, str(child.args[1].value)
            yield from visit(child, scope, in_class)

    yield from visit(tree, [], False)


def _found() -> set[tuple[str, str, str]]:
    fields = _owned_fields()
    found = set()
    for path in _sources():
        if path == OWNER:
            continue
        tree = source_trees.parse(path.read_text(), str(path))
        for where, attr in _writes(tree, fields):
            found.add((str(path.relative_to(ROOT)), where, attr))
    return found


def test_the_walk_sees_the_fields() -> None:
    """The walk reads real field names (a rename would otherwise let every write through)."""
    assert {"asked", "n_trials", "slots", "spec", "budget", "concurrency"} <= _owned_fields()


def test_a_runs_spec_view_is_frozen() -> None:
    """A change replaces the view whole (`StudyRun.change`): nothing can set one field of it."""
    view = run_spec.RunSpec(
        objective="tests.support.objectives:quadratic", inputs={}, concurrency=1
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        view.concurrency = 2  # type: ignore[misc]


def test_only_runs_py_writes_run_state() -> None:
    found = sorted(_found())
    assert not found, "run state written outside dispatch/runs.py (use the run's operations):\n" + (
        "\n".join(f"  {path} {where}: .{attr}" for path, where, attr in found)
    )


def test_no_class_outside_runs_py_derives_from_a_run() -> None:
    """What lets `self.<field> = ...` outside runs.py through: `self` is never a run there."""
    for path in _sources():
        if path == OWNER:
            continue
        for node in ast.walk(source_trees.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = {ast.unparse(base).rpartition(".")[2] for base in node.bases}
                assert not bases & set(OWNED_CLASSES), f"{path}: {node.name} derives from a run"


BROKER_SIDE = ("broker/daemon", "broker/dispatch", "broker/storage/continuity.py")
"""The broker's own modules: it reads what it published through the protocol's readers, never
through the front door (`optuna_rq.client`)."""


def test_the_broker_does_not_use_the_front_door() -> None:
    found = []
    for where in BROKER_SIDE:
        path = ROOT / where
        for source in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            for node in ast.walk(source_trees.parse(source.read_text(), str(source))):
                names = (
                    [node.module or ""]
                    if isinstance(node, ast.ImportFrom)
                    else [alias.name for alias in node.names]
                    if isinstance(node, ast.Import)
                    else []
                )
                if any(n == "optuna_rq.client" or n.startswith("optuna_rq.client.") for n in names):
                    found.append(f"{source.relative_to(ROOT)}:{node.lineno}")
    assert not found, f"the broker imports the front door: {found}"
