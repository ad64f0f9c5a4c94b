"""The import contract (pyproject's [tool.importlinter], checked by import-linter in CI) names
every module of the package by its role, so a new module cannot slip past it."""

from __future__ import annotations

from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")

ROOT = Path(__file__).resolve().parent.parent
CLI_PREFIX = "cli_"  # cli and its cli_* modules are the command line
PROTOCOL_MAY_IMPORT = {"protocol", "errors", "space", "spacefile"}
SHARED = {"protocol", "errors", "connection", "embedded", "processes", "space", "spacefile"}
SHARED |= {"outages"}  # how every process retries Redis and says it is away
SHARED |= {"sentinel"}  # the Redis behind Sentinel that connection reaches
SHARED |= {"failpoints"}  # the fault tests break either side
SHARED |= {"examples"}  # the demo's objective: imported by workers, by path, at run time


def _modules() -> set[str]:
    broker = ROOT / "broker"
    names = {p.stem for p in broker.glob("*.py") if p.name != "__init__.py"}
    names |= {p.parent.name for p in broker.glob("*/__init__.py")}
    return names | {"workers"}


def _contracts() -> dict[str, dict[str, list[str]]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {c["name"]: c for c in config["contracts"]}


def _qualified(names: set[str]) -> list[str]:
    return sorted(f"optuna_rq.{name}" for name in names)


def test_the_contract_names_every_module_by_its_role() -> None:
    modules = _modules()
    cli = {name for name in modules if name == "cli" or name.startswith(CLI_PREFIX)}
    contracts = _contracts()
    protocol = contracts["The protocol imports neither side"]
    assert protocol["source_modules"] == ["optuna_rq.protocol"]
    assert sorted(protocol["forbidden_modules"]) == _qualified(modules - PROTOCOL_MAY_IMPORT)
    workers = contracts["Workers import only the protocol and what both sides share"]
    assert workers["source_modules"] == ["optuna_rq.workers"]
    assert sorted(workers["forbidden_modules"]) == _qualified(modules - SHARED - {"workers"})
    only_cli = contracts["Only the CLI imports the workers"]
    assert sorted(only_cli["source_modules"]) == _qualified(modules - cli - {"workers"})
    assert only_cli["forbidden_modules"] == ["optuna_rq.workers"]
