"""The storages a broker opens are its operator's choice (`optuna_rq.storage.storage_policy`): what
each `--allow-storage` pattern matches, and what no pattern can make it open by accident."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from optuna_rq.errors import ConfigError, StorageNotAllowedError
from optuna_rq.storage.storage_policy import StoragePolicy, canonical_storage
from tests.support import source_trees

DEFAULT = "memory"
RunCli = Callable[..., subprocess.CompletedProcess[str]]


def allows(patterns: list[str], url: str, default: str = DEFAULT) -> bool:
    return StoragePolicy(default, patterns).allows(url)


def test_the_default_storage_alone_is_allowed_without_patterns(tmp_path: Path) -> None:
    default = f"journal:///{tmp_path}/studies.journal"
    policy = StoragePolicy(default)
    assert policy.allows(default)
    assert policy.allows(f"journal:///{tmp_path}/./sub/../studies.journal")  # the same file
    assert not policy.allows(f"journal:///{tmp_path}/other.journal")
    assert not policy.allows("memory")
    assert not policy.allows("sqlite:///x.db")
    with pytest.raises(StorageNotAllowedError, match="--allow-storage"):
        policy.check(f"journal:///{tmp_path}/other.journal")
    assert StoragePolicy("redis://cache:6379/0").allows("redis://cache:6379/0")  # named


def test_journal_paths_are_resolved_before_they_are_matched(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (tmp_path / "elsewhere").mkdir()
    pattern = [f"{data}/*.journal"]  # a bare path: journal files
    assert allows(pattern, f"journal:///{data}/a.journal")
    assert allows([f"journal:///{data}/*.journal"], f"journal:///{data}/a.journal")
    assert not allows(pattern, f"journal:///{data}/../elsewhere/a.journal")  # `..` escapes not
    assert not allows(pattern, f"journal:///{data}/sub/a.journal")  # `*`: one segment
    assert allows([f"{data}/**"], f"journal:///{data}/sub/deeper/a.journal")
    assert not allows([f"{data}/**"], f"journal:///{data}/../elsewhere/a.journal")
    # A symlink out of the allowed directory is matched where it leads.
    (data / "out").symlink_to(tmp_path / "elsewhere")
    assert not allows([f"{data}/**"], f"journal:///{data}/out/a.journal")
    # A pattern through a symlinked directory matches the files it leads to.
    (tmp_path / "link").symlink_to(data)
    assert allows([f"{tmp_path}/link/*.journal"], f"journal:///{data}/a.journal")
    # A relative path is the broker's working directory's.
    cwd = os.getcwd()
    try:
        os.chdir(data)
        assert allows([f"{data}/*.journal"], "journal://a.journal")
        assert allows(["./*.journal"], f"journal:///{data}/a.journal")
    finally:
        os.chdir(cwd)


def test_sqlite_paths_are_resolved_and_their_query_is_matched(tmp_path: Path) -> None:
    pattern = [f"sqlite:///{tmp_path}/*.db"]  # sqlite:////abs/*.db
    assert allows(pattern, f"sqlite:///{tmp_path}/studies.db")
    assert not allows(pattern, f"sqlite:///{tmp_path}/../studies.db")
    assert not allows(pattern, f"sqlite:///{tmp_path}/studies.db?uri=true")
    assert not allows(pattern, f"sqlite+pysqlite:///{tmp_path}/studies.db")  # another scheme
    assert canonical_storage(f"sqlite:///{tmp_path}/a/../b.db") == f"sqlite:///{tmp_path}/b.db"


def test_server_urls_are_matched_as_their_driver_reads_them_without_credentials() -> None:
    pattern = ["postgresql://db.internal/*"]
    assert allows(pattern, "postgresql://optuna:secret@db.internal/studies")
    assert not allows(pattern, "postgresql://db.internal:5432/studies")  # the port as written
    assert allows(["postgresql://db.internal:5432/*"], "postgresql://db.internal:5432/s")
    # libpq takes the host from the query too: a query is matched, and `*` does not cross `?`.
    assert not allows(pattern, "postgresql://db.internal/studies?host=evil.example")
    assert allows(["postgresql://db.internal/**"], "postgresql://db.internal/s?sslmode=require")
    # What SQLAlchemy connects to, not what a textual split would see: this is evil.example.
    assert not allows(pattern, "postgresql://db.internal:x@evil.example/studies")
    assert canonical_storage("postgresql://u:p/w@evil.example/db") == "postgresql://evil.example/db"
    assert not allows(pattern, "mysql://db.internal/studies")
    assert not allows(["*"], "postgresql://db.internal/studies")  # `*` stops at "/"
    assert allows(["**"], "postgresql://db.internal/studies")


def test_journal_redis_is_allowed_only_by_a_pattern_that_names_its_scheme() -> None:
    url = "redis://:hunter2@127.0.0.1:6379/0"
    for pattern in ("*", "**", "redis*://**", "*://127.0.0.1:6379/0", "**6379/0"):
        assert not allows([pattern], url), pattern
    assert allows(["redis://127.0.0.1:6379/*"], url)
    assert allows(["redis://**"], url)
    assert not allows(["redis://**"], "rediss://127.0.0.1:6379/0")  # TLS is another scheme
    assert allows(["rediss://**"], "rediss://127.0.0.1:6379/0")
    # redis-py takes the host from the query when the URL has none.
    assert not allows(["redis://127.0.0.1:6379/*"], "redis://127.0.0.1:6379/0?host=evil")
    why = StoragePolicy(DEFAULT, ["**"]).refusal(url)
    assert why is not None
    assert "JournalRedis" in why and "unpickles" in why and "'redis://'" in why
    assert "hunter2" not in why and "--allow-storage 'redis://127.0.0.1:6379/0'" in why


def test_a_refusal_names_the_url_without_its_password_and_the_option() -> None:
    why = StoragePolicy(DEFAULT).refusal("postgresql://optuna:hunter2@db.evil/x")
    assert why == (
        "storage 'postgresql://optuna:***@db.evil/x' is not allowed on this broker: it opens "
        "only its default storage and what its --allow-storage patterns match (its operator "
        "allows this one with: optuna-rq broker --allow-storage 'postgresql://db.evil/x')"
    )
    why = StoragePolicy(DEFAULT).refusal("postgresql://h:notaport/x")
    assert why is not None and "not a storage URL the broker can check" in why
    assert StoragePolicy(DEFAULT, ["memory"]).allows("memory")
    assert StoragePolicy(DEFAULT, ["*"]).allows("memory")


def test_patterns_that_would_not_mean_what_they_say_are_refused_at_start() -> None:
    with pytest.raises(ConfigError, match="user names and passwords are not matched"):
        StoragePolicy(DEFAULT, ["postgresql://optuna:pw@db.internal/*"])
    with pytest.raises(ConfigError, match=r"'\.' or '\.\.' after a wildcard"):
        StoragePolicy(DEFAULT, ["/data/*/../etc/x.journal"])
    with pytest.raises(ConfigError, match="names no file"):
        StoragePolicy(DEFAULT, ["sqlite:///"])


# -- every place the package opens a study storage ------------------------------------------

OPENERS = {
    "open_storage",  # storage.storage_access: the one that turns a URL into an Optuna storage
    "_open_guarded",
    "read_back",
    "RDBStorage",
    "JournalStorage",
    "JournalFileBackend",
    "JournalRedisBackend",
    "get_storage",
    "BatchedJournal",
    "JournalReader",
    "load_study",
    "create_study",
    "delete_study",
    "copy_study",
}
"""What opens a storage, or a study in one: a call of one of these (or `storages.open`)."""

SITES = {
    # The opener itself, and the broker's storages, which check the policy before it.
    ("storage/storage_access.py", "open_storage"): "the opener: its callers are listed here",
    ("storage/storage_access.py", "_open_rdb"): "open_storage's SQL databases, called by it alone",
    ("storage/guarded_storages.py", "Storages.open"): "checks the policy, opens (_open_guarded)",
    ("storage/guarded_storages.py", "_open_guarded"): "only from Storages.open, past the policy",
    ("storage/guarded_storages.py", "Storages.read_back"): "checks the policy, then opens",
    # The daemon's sites: through its Storages (`storages.open`, `storages.read_back`) only.
    ("daemon/run_opening.py", "open_run"): "a study starting: storages.open",
    ("daemon/registry.py", "Registry.start"): "its definition checked first: storages.open",
    ("daemon/registry.py", "Registry._fail_orphans"): "a study that faulted: storages.open",
    ("daemon/registry.py", "Registry.storage_failed"): "its figures: storages.read_back",
    ("daemon/command_handlers.py", "Commands.on_delete"): "delete --purge: storages.open",
    # Not from the wire.
    ("cli/broker_command.py", "broker"): "the broker's default storage: its operator's --storage",
    ("sampling/sampler_main.py", "_study"): "the journal of a run the broker opened (run.journal)",
    ("optimizer.py", "Optimizer.__post_init__"): "an in-memory study of the user's own",
    # The front door: only the storage its user names (`trials --storage URL`), never one a
    # status names; a file that does not exist is refused, not created (open_storage_to_read).
    ("cli/study_commands.py", "_stored_trials"): "the --storage URL its user names",
    ("storage/storage_access.py", "open_storage_to_read"): "a reader's opener: creates nothing",
    # Ended studies whose trials no broker published: through its Storages (`storages.open`).
    ("daemon/catch_up.py", "CatchUp._catch_up"): "an ended study's trials: storages.open",
}
"""Every site that opens a study storage, and why the storage policy holds there. A new one
fails `test_every_site_that_opens_a_storage_is_known` until it is listed (and checked)."""


def _opening_sites() -> dict[tuple[str, str], set[str]]:
    import ast

    root = Path(__file__).resolve().parents[2]
    found: dict[tuple[str, str], set[str]] = {}
    for folder, package in ((root / "broker", ""), (root / "workers", "workers/")):
        for path in sorted(folder.rglob("*.py")):
            module = package + path.relative_to(folder).as_posix()

            def visit(node: ast.AST, scope: list[str], module: str = module) -> None:
                for child in ast.iter_child_nodes(node):
                    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                        visit(child, [*scope, child.name])
                        continue
                    if isinstance(child, ast.Call):
                        func = child.func
                        name = (
                            func.id
                            if isinstance(func, ast.Name)
                            else func.attr
                            if isinstance(func, ast.Attribute)
                            else ""
                        )
                        through_storages = (
                            name == "open"
                            and isinstance(func, ast.Attribute)
                            and ast.unparse(func.value).endswith("storages")
                        )
                        if name in OPENERS or through_storages:
                            found.setdefault((module, ".".join(scope)), set()).add(name)
                    visit(child, scope)

            visit(source_trees.parse(path.read_text()), [])
    return found


def test_every_site_that_opens_a_storage_is_known() -> None:
    sites = _opening_sites()
    new, gone = sorted(set(sites) - set(SITES)), sorted(set(SITES) - set(sites))
    assert not new and not gone, (
        "a site that opens a study storage was added or removed: list it in SITES, with why "
        f"the broker's storage policy holds there (new: {new}; gone: {gone})"
    )
    # The daemon opens storages through its Storages alone: never the opener directly.
    for (module, function), openers in sites.items():
        if module.startswith("daemon/") and module != "storage/guarded_storages.py":
            assert openers & {"open_storage", "_open_guarded"} == set(), (module, function)
            assert openers & {"open", "read_back"}, (module, function)


def test_the_daemons_storages_open_nothing_the_policy_refuses(tmp_path: Path) -> None:
    from optuna_rq.storage.guarded_storages import Storages

    default = f"journal:///{tmp_path}/studies.journal"
    storages = Storages(policy=StoragePolicy(default))
    evil = tmp_path / "evil" / "x.journal"
    with pytest.raises(StorageNotAllowedError, match="--allow-storage"):
        storages.open(f"journal:///{evil}")
    with pytest.raises(StorageNotAllowedError, match="JournalRedis"):
        storages.open("redis://127.0.0.1:1/0")
    assert storages.read_back(f"journal:///{evil}", "s") is None
    assert not evil.parent.exists()
    storages.open(default)
    storages.close()


# -- the front door ------------------------------------------------------------------------


def _forge_status(conn: redis.Redis, prefix: str, name: str, storage: str) -> None:
    """What anyone who can write to Redis can write with signing off: a status naming a storage."""
    from optuna_rq.protocol import StudyState, StudyStatus

    status = StudyStatus(
        name=name,
        state=StudyState.FINISHED,
        objective="tests.support.objectives:quadratic",
        directions=["minimize"],
        n_trials=1,
        concurrency=1,
        priority=1.0,
        storage=storage,
    )
    conn.hset(f"{prefix}:status", name, status.to_json())


def test_trials_opens_no_storage_a_status_names_and_creates_none_it_is_given(
    conn: redis.Redis, prefix: str, run_cli: RunCli, cli_state: Path, tmp_path: Path
) -> None:
    import optuna

    from optuna_rq.storage.storage_access import open_storage

    # A path or a server a status names (forged here) is never opened: `trials` reads what the
    # broker published, nothing is created or contacted. None is published: no rows.
    evil = tmp_path / "evil" / "x.journal"
    _forge_status(conn, prefix, "ghost", f"journal:///{evil}")
    done = run_cli("trials", "ghost", "--format", "json")
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stderr
    assert not evil.parent.exists()
    _forge_status(conn, prefix, "pickled", "redis://127.0.0.1:1/0")
    done = run_cli("trials", "pickled", "--format", "csv")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 1, done.stderr

    # A storage the user names is read (no Redis needed), and only if it exists: a journal or
    # SQLite file that does not is refused, not created.
    own = f"journal:///{tmp_path}/own.journal"
    optuna.create_study(study_name="own", storage=open_storage(own)).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=1
    )
    done = run_cli("trials", "own", "--storage", own, "--format", "csv")
    assert done.returncode == 0 and len(done.stdout.splitlines()) == 2, done.stderr
    for missing in (f"journal:///{tmp_path}/none/x.journal", f"sqlite:///{tmp_path}/none.db"):
        done = run_cli("trials", "own", "--storage", missing)
        assert done.returncode == 2 and "no such file" in done.stderr, done.stderr
    assert not (tmp_path / "none").exists() and not (tmp_path / "none.db").exists()
    done = run_cli("trials", "other", "--storage", own)
    assert done.returncode == 2 and "study 'other' is not in" in done.stderr, done.stderr
