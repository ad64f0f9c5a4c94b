"""Following a study from its published status: the progress bar of `wait`, `submit --wait`
and `demo`."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optuna_rq.client import BrokerClient
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import StudyState, StudyStatus

__all__ = ["follow_study"]


def follow_study(
    client: BrokerClient,
    name: str,
    *,
    timeout_s: float | None,
    console: Console | None = None,
) -> int:
    """Show a progress bar until the study ends; the exit code says how it ended."""
    console = console or Console(stderr=True)
    if client.status(name) is None:
        raise ConfigError(
            f"unknown study {name!r} on prefix {client.prefix!r} (see `optuna-rq status`)"
        )
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("best {task.fields[best]}  {task.fields[failures]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        bar = progress.add_task(name, total=None, best="-", failures="")
        while True:
            snap = _current(client, name)
            done = snap.done
            best = snap.best
            failures = ", ".join(f"{k} {v}" for k, v in snap.fail_reasons.items())
            progress.update(
                bar,
                total=snap.n_trials,
                completed=done,
                best="-" if best is None else (f"{best:.6g}" if isinstance(best, float) else best),
                failures=f"failed: {failures}" if failures else "",
            )
            if snap.state.ended:
                break
            if deadline is not None and time.monotonic() >= deadline:
                console.print(f"[red]timeout:[/] study {name!r} is still {snap.state.value}")
                return 1
            time.sleep(0.2)
    if snap.state is StudyState.FINISHED:
        console.print(f"study {name!r} finished: {done} trials, best {best!r}")
        return 0
    console.print(
        f"[red]study {name!r} {snap.state.value}[/]" + (f": {snap.error}" if snap.error else "")
    )
    return 1


def _current(client: BrokerClient, name: str) -> StudyStatus:
    status = client.status(name)
    if status is None:
        raise ConfigError(f"study {name!r} vanished from prefix {client.prefix!r}")
    return status
