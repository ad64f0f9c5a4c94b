"""`optuna-rq redis`: the embedded redis-server that commands start when given no Redis URL.

It daemonizes and outlives the command that started it (so a broker, workers and later commands
on the machine share it); `optuna-rq redis stop` ends it.
"""

from __future__ import annotations

import typer

from optuna_rq.cli_command import App
from optuna_rq.cli_options import GlobalOptions

__all__ = ["redis_app"]

redis_app = App(
    name="redis",
    help="The embedded redis-server (used when no --redis-url is given): show it, or stop it.",
    no_args_is_help=True,
    rich_markup_mode=None,
)


@redis_app.command("stop")
def stop(ctx: typer.Context) -> None:
    """Stop the embedded redis-server of the state directory, if one runs.

    Its append-only file stays in the state directory: queued studies and trials are there
    when it starts again. Stop the broker and workers that use it first.
    """
    from optuna_rq.embedded import stop_embedded

    options: GlobalOptions = ctx.obj
    state = options.state()
    if stop_embedded(state):
        typer.echo(f"stopped the embedded redis-server under {state}", err=True)
    else:
        typer.echo(f"no embedded redis-server was running under {state}", err=True)


@redis_app.command("status")
def status(ctx: typer.Context) -> None:
    """Print the embedded redis-server's URL if it runs; exit 1 if it does not."""
    from optuna_rq.embedded import EmbeddedRedis

    options: GlobalOptions = ctx.obj
    embedded = EmbeddedRedis(options.state())
    pid = embedded.pid()
    if pid is None:
        typer.echo(f"no embedded redis-server is running under {embedded.state}", err=True)
        raise typer.Exit(1)
    typer.echo(f"{embedded.url} (pid {pid})")
