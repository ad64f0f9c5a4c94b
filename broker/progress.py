"""A study's published status on a terminal: the table of `status`, and the progress bar of
`wait`, `submit --wait` and `demo`."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from optuna_rq.client import BrokerClient
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import StudyStatus

__all__ = ["follow_study", "status_table"]


def follow_study(
    client: BrokerClient,
    name: str,
    *,
    timeout_s: float | None,
    console: Console | None = None,
    since: float | None = None,
) -> int:
    """Show a progress bar until the study ends (with `since`, a submission's `submitted_at`:
    ends after the broker took that submission). Exit code 0 if it finished with a COMPLETE
    trial; else 1, and a line saying why."""
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
            progress.update(
                bar,
                total=snap.n_trials,
                completed=done,
                best="-" if best is None else (f"{best:.6g}" if isinstance(best, float) else best),
                failures=_beside(snap),
            )
            taken = since is None or (snap.submitted_at is not None and snap.submitted_at >= since)
            if snap.state.ended and taken:
                break
            if deadline is not None and time.monotonic() >= deadline:
                console.print(f"[red]timeout:[/] study {name!r} is still {snap.state.value}")
                return 1
            time.sleep(0.2)
    why = snap.outcome()
    if why is None:
        console.print(f"study {name!r} finished: {done} trials, best {best!r}")
        if snap.error:  # a resubmission the broker could not run
            console.print(f"[red]{snap.error}[/]")
            return 1
        return 0
    console.print(f"[red]study {name!r} {why}[/]")
    return 1


def _beside(snap: StudyStatus) -> str:
    """What the bar shows beside the budget: retries, and failures by reason."""
    parts = [f"retries {snap.retries}"] if snap.retries else []
    failures = ", ".join(f"{k} {v}" for k, v in sorted(snap.fail_reasons.items()))
    if failures:
        parts.append(f"failed: {failures}")
    return "  ".join(parts)


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
        (
            "trials",
            f"{snapshot.done} / {snapshot.n_trials} done, {snapshot.running} running"
            + (f", {snapshot.retries} retries" if snapshot.retries else ""),
        ),
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
    for label, value in rows:
        table.add_row(label, value)
    return table
