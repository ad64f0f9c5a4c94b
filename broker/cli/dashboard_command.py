"""`optuna-rq dashboard`: optuna-dashboard on the broker's study storage, with no path to find.

Which storage: `--storage URL` if given; else the ones the broker publishes. Every study's
status names its storage: the broker's default (its `--storage`, or the journal in its state
directory, `storage.storage_access.default_storage_url`) for a study submitted without one, else
the study's own. The dashboard opens the broker's default, or, where no study names it yet, the
default journal of this machine's state directory; the studies of any other storage are listed
with the command that opens theirs. A storage is opened as a reader that creates nothing
(`storage.storage_access.open_storage_to_read`), and never one that unpickles what it loads
(Optuna's JournalRedis) on the word of a status: anyone who can write to Redis writes statuses.

Like the other front doors that only read, it never starts a redis-server: with no Redis to
reach (no --redis-url and no embedded server running), it shows the default journal alone.
"""

from __future__ import annotations

import os
import shlex
import signal
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated

import typer

from optuna_rq.cli.options import GlobalOptions, read_client
from optuna_rq.cli.output import err_console
from optuna_rq.errors import ConfigError, RedisUnavailableError
from optuna_rq.plumbing.locations import redact_url, state_path

if TYPE_CHECKING:
    from optuna.storages import BaseStorage

__all__ = ["dashboard"]


DEFAULT_PORT = 8080
DEFAULT_HOST = "127.0.0.1"


@dataclass
class _Storage:
    """A storage the broker's studies live in, as published."""

    url: str
    studies: list[str] = field(default_factory=list)
    default: bool = False  # the broker's default storage


def dashboard(
    ctx: typer.Context,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="URL",
            help="Show this Optuna storage (journal:///path, sqlite:///..., postgresql://...) "
            "instead of the broker's. Default: the broker's default storage, as its studies' "
            "statuses name it, else the journal under the state directory.",
            show_default=False,
        ),
    ] = None,
    host: Annotated[
        str,
        typer.Option(
            "--host",
            metavar="ADDRESS",
            help="Listen on this address. The dashboard has no login: 0.0.0.0 shows every "
            "study to whoever reaches the port.",
        ),
    ] = DEFAULT_HOST,
    port: Annotated[
        int,
        typer.Option(
            "--port", min=0, max=65535, metavar="PORT", help="Listen on this port (0: a free one)."
        ),
    ] = DEFAULT_PORT,
    allow_writes: Annotated[
        bool,
        typer.Option(
            "--allow-writes",
            help="Let the page write to the storage (notes, user attributes, telling, renaming "
            "or deleting studies). Default: read-only, every write refused (403).",
        ),
    ] = False,
) -> None:
    """Serve optuna-dashboard on the broker's study storage, read-only, on 127.0.0.1:8080.

    Finds the storage itself: the broker's default (the studies' statuses name it), else the
    journal under the state directory; studies kept in other storages are listed with the
    command that opens theirs. optuna-dashboard comes with the extra: pip install
    'optuna-rq[dashboard]'. Reads through Redis: never starts a redis-server. SIGTERM or Ctrl-C
    stops it.
    """
    from optuna_rq.cli.dashboard_app import bind, dashboard_app, require_dashboard, serve

    options: GlobalOptions = ctx.obj
    require_dashboard()  # before anything is read: the fix is an install, not an option
    url, opened = _open(options, storage)
    server = bind(dashboard_app(opened, allow_writes=allow_writes), host, port)
    shown = f"[{host}]" if ":" in host else host
    address = f"http://{shown}:{server.server_port}/"
    mode = "read-write (--allow-writes)" if allow_writes else "read-only"
    err_console().print(
        f"optuna-dashboard on {address} ({mode}), storage {redact_url(url)}; Ctrl-C stops it",
        markup=False,
        highlight=False,
        soft_wrap=True,
    )
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    serve(server, stop)


def _open(options: GlobalOptions, given: str | None) -> tuple[str, BaseStorage]:
    """The storage to show, and its URL: `given`, else the broker's (see the module)."""
    from optuna_rq.storage.storage_access import open_storage_to_read

    if given is not None:
        return given, open_storage_to_read(given)
    candidates, notes = _published(options)
    refused: list[str] = []
    chosen: tuple[str, BaseStorage] | None = None
    for candidate in candidates:
        why = _unopenable(candidate.url)
        if why is None:
            try:
                chosen = candidate.url, open_storage_to_read(candidate.url)
            except (ConfigError, OSError) as exc:
                why = str(exc)
        if chosen is not None:
            later = candidates[candidates.index(candidate) + 1 :]
            for line in notes + refused + [_elsewhere(c) for c in later if c.studies]:
                err_console().print(line, markup=False, highlight=False, soft_wrap=True)
            return chosen
        names = f" ({', '.join(candidate.studies)})" if candidate.studies else ""
        refused.append(f"not shown, storage {redact_url(candidate.url)}{names}: {why}")
    raise ConfigError(
        "no study storage to show: "
        + "; ".join(refused + notes or ["no storage found"])
        + "; give one this machine reaches with --storage URL"
    )


def _published(options: GlobalOptions) -> tuple[list[_Storage], list[str]]:
    """The storages to try, first to last (the broker's default, the state directory's
    journal, the others by how many studies they hold), and what the user should know."""
    from optuna_rq.protocol.status import RefusedStatus
    from optuna_rq.storage.storage_access import default_storage_url

    local = default_storage_url(state_path(options.state_dir))
    notes: list[str] = []
    found: dict[str, _Storage] = {}
    try:
        client = read_client(options)
    except RedisUnavailableError as exc:
        if options.redis_url:  # the Redis the user named is down: say so, guess nothing
            raise
        notes.append(f"no Redis reached ({exc}): only this machine's default journal is looked at")
        client = None
    if client is not None:
        unread = driven = 0
        for status in client.statuses():
            if isinstance(status, RefusedStatus):
                unread += 1
                continue
            if status.driven:  # in the remote Optimizer's own storage (its process's)
                driven += 1
                continue
            spec = client.stored_spec(status.name)
            default = spec is not None and spec.storage is None
            if not status.storage:  # queued: the broker has not named its default yet
                continue
            entry = found.setdefault(status.storage, _Storage(status.storage))
            entry.studies.append(status.name)
            entry.default = entry.default or default
        if unread:
            notes.append(f"{unread} studies whose status does not verify are left out")
        if driven:
            notes.append(
                f"{driven} studies run by a remote Optimizer are in the storage its script gives "
                "it (not published): `optuna-rq dashboard --storage URL` shows them"
            )
    ordered = sorted(found.values(), key=lambda s: (not s.default, -len(s.studies)))
    if not any(s.default for s in ordered):
        entry = found.get(local) or _Storage(local)
        entry.default = True
        ordered = [entry, *(s for s in ordered if s is not entry)]
    return ordered, notes


def _unopenable(url: str) -> str | None:
    """Why the dashboard does not open `url`, a storage named by a status, by itself."""
    from optuna_rq.storage.storage_access import journal_path
    from optuna_rq.storage.storage_policy import PICKLING_SCHEMES

    path = journal_path(url)
    if path is not None and not path.is_file():
        shown = os.path.realpath(path)  # journal:////abs/path is the broker's own spelling
        return f"no file {shown} on this machine: run the dashboard where the broker runs"
    if url == "memory":
        return "the broker keeps these studies in its memory: nothing to read from outside it"
    if url.partition("://")[0] in PICKLING_SCHEMES:
        return (
            "Optuna's JournalRedis unpickles what it loads, and a status is no reason to trust "
            "it: open it with --storage URL if you do"
        )
    return None


def _elsewhere(storage: _Storage) -> str:
    """The line naming studies of another storage and the command that shows them."""
    names = ", ".join(storage.studies[:5]) + (", ..." if len(storage.studies) > 5 else "")
    shown = redact_url(storage.url)
    password = " (with its password)" if shown != storage.url else ""
    why = _unopenable(storage.url)
    opens = (
        f"not shown ({why})"
        if why is not None
        else f"`optuna-rq dashboard --storage {shlex.quote(shown)} --port PORT` "
        f"shows them{password}"
    )
    return f"{len(storage.studies)} studies are in storage {shown} ({names}): {opens}"
