"""`optuna-rq cancel` and `optuna-rq set`: commands the broker applies to a study, sent through
Redis (never a redis-server started for them)."""

from __future__ import annotations

from typing import Annotated

import typer

from optuna_rq.cli.options import StudyName, command_client
from optuna_rq.cli.output import err_console
from optuna_rq.errors import ConfigError

__all__ = ["cancel", "set_command"]


def cancel(ctx: typer.Context, name: StudyName) -> None:
    """Cancel a study: no new trials; queued and running ones end FAIL (cancelled).

    A command the broker applies, sent through Redis: it never starts a redis-server.
    """
    client = command_client(ctx.obj)
    client.require_status(name)
    client.cancel(name)
    err_console().print(f"cancelling study {name!r}")


def set_command(
    ctx: typer.Context,
    name: StudyName,
    concurrency: Annotated[
        int | None,
        typer.Option("--concurrency", min=1, metavar="N", help="New cap on trials at once."),
    ] = None,
    n_trials: Annotated[
        int | None,
        typer.Option("--n-trials", min=1, metavar="N", help="New budget: trials in all."),
    ] = None,
    priority: Annotated[
        float | None,
        typer.Option(
            "--priority", min=0.001, metavar="WEIGHT", help="New weight in sharing workers."
        ),
    ] = None,
) -> None:
    """Change a running study's cap, budget or priority.

    An ended study (finished, cancelled, failed), or one a stop condition is winding down, is
    refused (exit 2): resubmitting it reopens it. A budget below the trials the study has
    started winds it down: it starts no more, and finishes once they end. A command the broker
    applies, sent through Redis: it never starts a redis-server.
    """
    changes = {
        k: v
        for k, v in {"concurrency": concurrency, "n_trials": n_trials, "priority": priority}.items()
        if v is not None
    }
    if not changes:
        raise ConfigError("nothing to change: give --concurrency, --n-trials or --priority")
    client = command_client(ctx.obj)
    client.require_status(name)
    status = client.change(name, **changes)
    err_console().print(f"study {name!r}: {changes}")
    started = 0 if status is None else status.done + status.running
    if n_trials is not None and n_trials < started:
        err_console().print(
            f"study {name!r} has started {started} trials, more than --n-trials {n_trials}: "
            f"it starts no more, and finishes once they end (its budget becomes what it started)"
        )
