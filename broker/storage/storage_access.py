"""Where a study's trials are kept: its Optuna storage, opened from the URL the broker was given.

The submission itself (`StudySpec`) is a protocol message: `optuna_rq.protocol.spec`.
"""

from __future__ import annotations

import logging
import urllib.parse
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import optuna

from optuna_rq.errors import ConfigError
from optuna_rq.plumbing.locations import redact_url

__all__ = [
    "STORAGE_SOCKET_TIMEOUT_S",
    "created_despite_races",
    "default_storage_url",
    "is_sql",
    "journal_path",
    "open_storage",
    "open_storage_to_read",
]

log = logging.getLogger("optuna_rq.broker")

T = TypeVar("T")


_memory = optuna.storages.InMemoryStorage()

STORAGE_SOCKET_TIMEOUT_S = 10
"""How long a `redis://` study storage may take to connect or answer before the call fails (and
with it the studies on that storage): without it, a server that hangs freezes the broker."""


def default_storage_url(state: Path) -> str:
    return f"journal:///{state / 'studies.journal'}"


def journal_path(url: str) -> Path | None:
    """The file of a `journal:///path` URL; None for any other URL."""
    if not url.startswith("journal://"):
        return None
    return Path(url.removeprefix("journal://"))


def is_sql(url: str) -> bool:
    """Whether `url` opens an SQL database (Optuna's RDBStorage): not `memory`, a journal file
    or Redis."""
    if url == "memory" or journal_path(url) is not None:
        return False
    return not url.startswith(("redis://", "rediss://"))


def open_storage(
    url: str, *, engine_kwargs: dict[str, Any] | None = None
) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url`: `memory`, `journal:///path`, or any RDB URL Optuna takes
    (its engine made with `engine_kwargs`).

    A journal file opens as Optuna opens it (`JournalFileBackend`: locked and re-read on every
    operation), as a reader beside the broker must (`optuna-rq trials`, the tests); the broker
    itself writes its journals through `optuna_rq.storage.journal_file` (see `guarded_storages`).

    `redis://` gives Optuna's JournalRedis, with a warning: it unpickles a snapshot key on load,
    so anyone who can write to that Redis could run code in the broker. Its socket timeouts
    default to `STORAGE_SOCKET_TIMEOUT_S` (set `?socket_timeout=S` in the URL to change them).
    """
    if url == "memory":
        return _memory
    path = journal_path(url)
    if path is not None:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path)))
    if url.startswith(("redis://", "rediss://")):
        from optuna.storages.journal import JournalRedisBackend, JournalStorage

        log.warning(
            "storage %s: Optuna's JournalRedis unpickles a snapshot key on load, so anyone who "
            "can write to that Redis can run code in the broker; prefer the journal file, "
            "sqlite or postgresql",
            redact_url(url),
        )
        return JournalStorage(JournalRedisBackend(_with_timeouts(url)))
    return _open_rdb(url, engine_kwargs)


SCHEMA_ATTEMPTS = 5
"""How many times tables are created where the first try raced another process's: Optuna
creates its tables (and PostgreSQL's enum types) as it opens a storage, checking first, so two
brokers (an active and a standby) starting on an empty database may both try to create them,
and one fails on what the other created. Tried again, it finds them."""


def created_despite_races(create: Callable[[], T], what: str) -> T:
    """`create()`, which creates tables where missing, tried again (up to `SCHEMA_ATTEMPTS`)
    where it failed on what another process was creating at the same time (`what`: for the
    log)."""
    import sqlalchemy.exc

    attempt = 1
    while True:
        try:
            return create()
        except (sqlalchemy.exc.IntegrityError, sqlalchemy.exc.ProgrammingError):
            if attempt == SCHEMA_ATTEMPTS:
                raise
            attempt += 1
            log.info("%s: another process was creating its tables", what)


def _open_rdb(url: str, engine_kwargs: dict[str, Any] | None) -> optuna.storages.BaseStorage:
    try:
        return created_despite_races(
            lambda: optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs),
            f"storage {redact_url(url)}",
        )
    except Exception as exc:
        raise _rejected(url, exc) from exc


def _rejected(url: str, exc: Exception) -> ConfigError:
    return ConfigError(f"storage URL {redact_url(url)!r} was rejected by Optuna: {exc}")


def open_storage_to_read(url: str) -> optuna.storages.BaseStorage:
    """An Optuna storage for `url` that a reader (`optuna-rq trials --storage URL`) opens as
    it is, creating nothing: ConfigError naming `url` for a journal or SQLite file that does not
    exist, or for `memory` (a process's own: nothing to read in another); an SQL database's
    tables are not created."""
    path = journal_path(url)
    if url == "memory":
        raise ConfigError(
            "--storage memory: an in-memory storage is the broker's own; only the broker reads "
            "it (`optuna-rq trials NAME` without --storage shows what it publishes)"
        )
    if path is None and url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///").partition("?")[0])
    if path is not None and not path.expanduser().is_file():
        raise ConfigError(f"--storage {redact_url(url)!r}: no such file {str(path)!r}")
    if path is not None or url.startswith(("redis://", "rediss://")):
        return open_storage(url)
    try:
        return optuna.storages.RDBStorage(url, skip_table_creation=True)
    except Exception as exc:
        raise _rejected(url, exc) from exc


def _with_timeouts(url: str) -> str:
    """`url` with redis-py's socket timeouts (`STORAGE_SOCKET_TIMEOUT_S`) unless it sets them."""
    query = urllib.parse.urlsplit(url).query
    given = {key for key, _value in urllib.parse.parse_qsl(query)}
    extra = [
        f"{key}={STORAGE_SOCKET_TIMEOUT_S}"
        for key in ("socket_timeout", "socket_connect_timeout")
        if key not in given
    ]
    if not extra:
        return url
    return f"{url}{'&' if query else '?'}{'&'.join(extra)}"
