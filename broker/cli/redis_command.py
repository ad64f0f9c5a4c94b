"""`optuna-rq redis`: the embedded redis-server that commands start when given no Redis URL.

It daemonizes and outlives the command that started it (so a broker, workers and later commands
on the machine share it); `optuna-rq redis stop` ends it, unless something still uses it: a
broker that serves a prefix on it, a worker pool whose heartbeat is live, or any other client
connection (a `wait`, a dashboard). Stopped under them, they would wait for a Redis that is gone;
`--force` stops it anyway.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optuna_rq.cli.options import GlobalOptions
from optuna_rq.cli.parsing import App
from optuna_rq.errors import RedisInUseError

if TYPE_CHECKING:
    import redis

__all__ = ["redis_app", "users_of"]

redis_app = App(
    name="redis",
    help="The embedded redis-server (used when no --redis-url is given): show it, or stop it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)

_NAMES_SHOWN = 3  # of the pools and connections named in a refusal


@redis_app.command("stop")
def stop(
    ctx: typer.Context,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Stop it even while a broker, workers or other clients use it (they wait for "
            "Redis until it runs again).",
        ),
    ] = False,
) -> None:
    """Stop the embedded redis-server of the state directory, if one runs.

    Its append-only file stays in the state directory: queued studies and trials are there
    when it starts again. While a broker, workers or any other client use it, it is left
    running and the command exits 1 naming them: stop them first, or pass --force.
    """
    from optuna_rq.plumbing.embedded import EmbeddedRedis

    options: GlobalOptions = ctx.obj
    embedded = EmbeddedRedis(options.state())
    if not force and embedded.answers():
        with contextlib.closing(embedded.client(timeout_s=5.0)) as connection:
            users = users_of(connection)
        if users:
            raise RedisInUseError(
                f"the embedded redis-server under {embedded.state} is in use: "
                f"{'; '.join(users)}. Stop them first, or pass --force"
            )
    if embedded.stop():
        typer.echo(f"stopped the embedded redis-server under {embedded.state}", err=True)
    else:
        typer.echo(f"no embedded redis-server was running under {embedded.state}", err=True)


def users_of(connection: redis.Redis) -> list[str]:
    """Who uses the server `connection` reaches, one phrase each: the brokers serving a prefix
    on it, the worker pools whose heartbeat is live, and the other client connections (the
    brokers' and pools' among them: a frozen process keeps its connection, a killed one does
    not). Empty if nothing does."""
    from optuna_rq.protocol import Keys
    from optuna_rq.protocol.liveness import read_liveness, where

    every = Keys("*")  # every prefix's keys, as patterns: `*:broker`, `*:pool:*`
    users = []
    for key in _keys(connection, every.broker):
        keys = Keys(key.removesuffix(every.broker.removeprefix("*")))
        liveness = read_liveness(connection, keys)
        if liveness.serves:
            users.append(f"the broker of prefix {keys.prefix!r} ({where(liveness.holder or '?')})")
    pools: dict[str, list[str]] = {}
    for key in _keys(connection, every.pool("*")):
        prefix, _, pool = key.rpartition(every.pool("").removeprefix("*"))
        pools.setdefault(prefix, []).append(pool)
    for prefix, ids in sorted(pools.items()):
        pool_s = _count(len(ids), "worker pool")
        users.append(f"{pool_s} of prefix {prefix!r} {_some(sorted(ids))}")
    own = connection.client_id()
    others: list[dict[str, Any]] = [
        c for c in connection.client_list() if int(c.get("id", -1)) != own
    ]
    if others:
        names = sorted({str(c["name"]) for c in others if c.get("name")})
        named = f" {_some(names)}" if names else ""
        users.append(f"{_count(len(others), 'other client connection')}{named}")
    return users


def _keys(connection: redis.Redis, pattern: str) -> list[str]:
    """The string keys matching `pattern` (a server for one machine holds few keys)."""
    return sorted(
        bytes(key).decode(errors="replace")
        for key in connection.scan_iter(match=pattern, count=1000, _type="string")
    )


def _count(count: int, what: str) -> str:
    return f"{count} {what}{'' if count == 1 else 's'}"


def _some(names: list[str]) -> str:
    """`(a, b, c and 2 more)`."""
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = len(names) - _NAMES_SHOWN
    return f"({shown}{f' and {more} more' if more > 0 else ''})"


@redis_app.command("status")
def status(ctx: typer.Context) -> None:
    """Print the embedded redis-server's URL if it runs; exit 1 if it does not."""
    from optuna_rq.plumbing.embedded import EmbeddedRedis

    options: GlobalOptions = ctx.obj
    embedded = EmbeddedRedis(options.state())
    pid = embedded.pid()
    if pid is None:
        typer.echo(f"no embedded redis-server is running under {embedded.state}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{embedded.url} (pid {pid})")
