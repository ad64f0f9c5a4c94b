"""A study's published status on a terminal: the table of `status`, and the progress bar of
`wait`, `submit --wait` and `demo`."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from optuna_rq.client import BrokerClient
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import StudyState, StudyStatus

__all__ = ["follow_study", "status_table"]


def follow_study(
    client: BrokerClient,
    name: str,
    *,
    timeout_s: float | None,
    console: Console | None = None,
) -> int:
    """Show a progress bar until the study ends; the exit code says how it ended."""
    console = console or Console(stderr=True)
    client.require_status(name)
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
                failures=(f"failed: {failures}" if failures else "") + _waiting_note(snap),
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


def _waiting_note(snap: StudyStatus) -> str:
    """What a study with no live worker on its queue waits for, and how to start one."""
    if not snap.waiting_for_workers or snap.state.ended:
        return ""
    return f"  waiting for a worker: {_worker_command(snap)}"


def _worker_command(snap: StudyStatus) -> str:
    """The command that starts a worker for the study's trials."""
    module = snap.objective.partition(":")[0]
    queue = "" if snap.queue == "default" else f" --queue {snap.queue}"
    return f"optuna-rq workers --import {module}{queue}"


def _current(client: BrokerClient, name: str) -> StudyStatus:
    status = client.status(name)
    if status is None:
        raise ConfigError(f"study {name!r} vanished from prefix {client.prefix!r}")
    return status


def status_table(snapshot: StudyStatus) -> Table:
    """One study's state, trials by outcome, failures by reason and best trial, as a table."""
    table = Table(title=f"study {snapshot.name}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    best = snapshot.best
    rows = [
        ("state", snapshot.state.value + (f" ({snapshot.error})" if snapshot.error else "")),
        ("objective", snapshot.objective),
        ("queue", snapshot.queue),
        ("trials", f"{snapshot.done} / {snapshot.n_trials} done, {snapshot.running} running"),
        (
            "outcomes",
            f"{snapshot.complete} complete, {snapshot.pruned} pruned, {snapshot.failed} failed",
        ),
        (
            "fail reasons",
            ", ".join(f"{k}: {v}" for k, v in snapshot.fail_reasons.items()) or "-",
        ),
        ("concurrency", str(snapshot.concurrency)),
        ("best", "-" if best is None else repr(best)),
        ("best params", "-" if not snapshot.best_params else repr(snapshot.best_params)),
        ("storage", snapshot.storage),
    ]
    if _waiting_note(snapshot):
        rows.insert(1, ("waiting for a worker", f"start one: {_worker_command(snapshot)}"))
    for label, value in rows:
        table.add_row(label, value)
    return table
