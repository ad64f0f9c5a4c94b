"""The front doors act through Redis and the broker alone: they never start a redis-server
unless they are the command that may (`broker`, `workers`, `submit`, `demo`), never open a
storage but the one their user names (`trials --storage URL`; `dashboard`, whose purpose is to
open the broker's), and create nothing on the machine
they run on. Every command of the app, and every site in the command line's source that could
start a server, open a storage or create a file, is enumerated here, so a new one is covered by
its existence. The same with real processes on two "machines": tests/processes/test_any_machine.py.
"""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest
import typer

from optuna_rq.cli.app import app
from optuna_rq.plumbing.embedded import EmbeddedRedis
from tests.storage.test_storage_policy import OPENERS
from tests.support import source_trees
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

MAY_START_A_SERVER = {"broker", "workers", "submit", "demo"}
"""The commands that may start the embedded redis-server when given no Redis URL: what runs a
study on this machine (and `submit`, which may be the first command run on it)."""

# Every other command, with arguments that get it as far as it goes without a Redis, and what
# it says then: (argv, exit code, a fragment of its stderr).
NEVER_START_A_SERVER: dict[str, tuple[tuple[str, ...], int, str]] = {
    "status": (("status",), 1, "no embedded redis-server running"),
    "wait": (("wait", "s"), 1, "no embedded redis-server running"),
    "trials": (("trials", "s"), 1, "no embedded redis-server running"),
    "best": (("best", "s"), 1, "no embedded redis-server running"),
    "cancel": (("cancel", "s"), 1, "no embedded redis-server running"),
    "set": (("set", "s", "--concurrency", "2"), 1, "no embedded redis-server running"),
    "delete": (("delete", "s"), 1, "no embedded redis-server running"),
    "enqueue": (("enqueue", "s", "{sets}"), 1, "no embedded redis-server running"),
    "keys": (("keys", "{keys}"), 0, ""),
    "redis status": (("redis", "status"), 1, "no embedded redis-server is running"),
    "redis stop": (("redis", "stop"), 0, "no embedded redis-server was running"),
    # With no Redis it looks at this machine's default journal alone: there is none here.
    "dashboard": (("dashboard",), 2, "no study storage to show"),
}


def _commands(group: typer.core.TyperGroup, prefix: str = "") -> set[str]:
    """Every command of the app, by its path ("redis stop")."""
    found: set[str] = set()
    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, typer.core.TyperGroup):
            found |= _commands(command, prefix=f"{path} ")
        else:
            found.add(path)
    return found


def test_every_command_is_listed_as_one_that_may_start_a_server_or_one_that_never_does() -> None:
    commands = _commands(typer.main.get_command(app))  # type: ignore[arg-type]
    assert MAY_START_A_SERVER.isdisjoint(NEVER_START_A_SERVER)
    assert commands == MAY_START_A_SERVER | set(NEVER_START_A_SERVER), (
        "a command was added or removed: list it in MAY_START_A_SERVER (it may start the "
        "embedded redis-server) or NEVER_START_A_SERVER (with how it ends without a Redis)"
    )


@pytest.mark.processes
@pytest.mark.parametrize("command", sorted(NEVER_START_A_SERVER))
def test_a_command_that_never_starts_a_server_starts_none(command: str, tmp_path: Path) -> None:
    """With no Redis URL and no embedded server, each says there is none, naming the fix, and
    starts none (cancel, set, delete and enqueue of a study nobody knows included)."""
    sets = tmp_path / "sets.yaml"
    sets.write_text("- {x: 1}\n")
    state = tmp_path / "state"
    args, code, says = NEVER_START_A_SERVER[command]
    args = tuple(a.format(sets=sets, keys=tmp_path / "keys") for a in args)
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(state))
    env.pop("OPTUNA_RQ_REDIS_URL", None)
    try:
        done = subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)
    finally:
        if (state / "redis.pid").exists():  # one it should not have started: not left running
            EmbeddedRedis(state).stop()
    assert done.returncode == code, (args, done.stderr)
    assert says in done.stderr, (args, done.stderr)
    assert not (state / "redis.sock").exists() and not (state / "redis.pid").exists(), args
    if command not in ("redis status", "redis stop"):  # about the state directory itself
        assert not state.exists(), (args, sorted(state.rglob("*")))  # nothing created


# -- the sites in the source -------------------------------------------------------------------

FRONT_DOOR_MODULES = ["client.py"]
FRONT_DOOR_MODULES += [
    str(p.relative_to(ROOT / "broker"))
    for room in ("cli", "terminal")
    for p in sorted((ROOT / "broker" / room).glob("*.py"))
]
"""Everything a command line process runs before it hands over to a broker or workers: the
commands themselves (cli/), the client and the progress display (terminal/)."""

MAKES_STATE = {
    "state",  # GlobalOptions.state(): the state directory, created
    "state_dir",  # the same, by locations.state_dir
    "resolve_redis_url",  # starts the embedded redis-server when there is no URL
    "ensure_embedded",
    "connect_redis",  # resolve_redis_url's caller
    "make_client",  # connect_redis's
    "mkdir",
    "write_text",
    "write_bytes",
    "open_storage_to_read",
}
"""Calls that create a file or a directory, or start a server, or lead to one that does."""

SITES = {
    # A storage: only the one the user names, and nothing created for it.
    (
        "cli/study_commands.py",
        "_stored_trials",
    ): "load_study, open_storage_to_read: `trials --storage`",
    # The one front door that opens a storage a status names (that is what it is for): as a
    # reader that creates nothing, never JournalRedis (it unpickles), never an unverified one.
    (
        "cli/dashboard_command.py",
        "_open",
    ): "open_storage_to_read: `dashboard`, the broker's storage",
    # Not a file: click's HelpFormatter.write_text, the help's global options paragraph.
    ("cli/parsing.py", "Command.format_options"): "formatter.write_text: help text, no file",
    # The embedded server: started by `submit` alone among the front doors.
    (
        "cli/submit_command.py",
        "submit",
    ): "make_client: submit may be the first command run on a machine",
    ("cli/options.py", "make_client"): "connect_redis: for submit",
    ("cli/options.py", "connect_redis"): "resolve_redis_url: the embedded server, if no URL",
    ("cli/options.py", "GlobalOptions.state"): "state_dir: for the commands below alone",
    # What keeps state on this machine, as it is asked to.
    ("cli/broker_command.py", "broker"): "state, connect_redis: the ledger and default storage",
    ("cli/workers_command.py", "workers"): "connect_redis: workers may start the embedded server",
    ("cli/key_commands.py", "write_key_set"): "mkdir: the key directory its user names",
    ("cli/redis_command.py", "stop"): "state: the embedded server's own directory",
    ("cli/redis_command.py", "status"): "state: the embedded server's own directory",
    ("cli/demo.py", "run_demo"): "ensure_embedded: the demo's private server, in a temporary dir",
}
"""Every site in the front doors' source that opens a storage, starts a server or creates a
file or a directory, and why it may."""


def _sites() -> dict[tuple[str, str], set[str]]:
    found: dict[tuple[str, str], set[str]] = {}
    watched = OPENERS | MAKES_STATE
    for module in FRONT_DOOR_MODULES:

        def visit(node: ast.AST, scope: list[str], module: str = module) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    visit(child, [*scope, child.name])
                    continue
                if isinstance(child, ast.Call):
                    func = child.func
                    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                    if name in watched:
                        found.setdefault((module, ".".join(scope)), set()).add(name)
                visit(child, scope)

        visit(source_trees.parse((ROOT / "broker" / module).read_text()), [])
    return found


def test_every_front_door_site_that_opens_a_storage_starts_a_server_or_makes_a_file_is_known() -> (
    None
):
    sites = _sites()
    new, gone = sorted(set(sites) - set(SITES)), sorted(set(SITES) - set(sites))
    assert not new and not gone, (
        "a front door site that opens a storage, starts a server or creates a file was added or "
        f"removed: list it in SITES with why it may (new: {new}; gone: {gone})"
    )
    # The storage `trials` opens is the one its user names, never a status's.
    trials = ast.unparse(
        next(
            node
            for node in ast.walk(
                source_trees.parse((ROOT / "broker" / "cli" / "study_commands.py").read_text())
            )
            if isinstance(node, ast.FunctionDef) and node.name == "trials"
        )
    )
    assert (
        "if storage is not None:\n        entries: list[Any] = _stored_trials(name, storage)"
        in (trials)
    ), trials
    assert "status.storage" not in trials
