"""`optuna-rq status` and `optuna-rq wait`: what the broker publishes of its studies, read through
Redis (never a redis-server started for it), as lines, a study's detail, JSON, or a progress bar
followed until the study ends."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from optuna_rq.cli.options import GlobalOptions, StudyName, WaitForBroker, read_client
from optuna_rq.cli.output import err_console, json_text
from optuna_rq.plumbing.locations import DEFAULT_PREFIX
from optuna_rq.protocol.status import RefusedStatus
from optuna_rq.terminal.status_view import REFUSED, ShownState

if TYPE_CHECKING:
    from optuna_rq.client import BrokerClient
    from optuna_rq.protocol import StudyStatus
    from optuna_rq.protocol.liveness import BrokerLiveness

__all__ = ["follow_exit", "status", "wait_command"]


def status(
    ctx: typer.Context,
    name: Annotated[
        str | None,
        typer.Argument(help="A study (its detail), or a pattern like 'sweep-*'; default: all."),
    ] = None,
    state: Annotated[
        list[ShownState] | None,
        typer.Option(
            "--state", case_sensitive=False, help="Only studies in this state; repeatable."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show studies, one line each: state, done/budget, running, failed, best, age.

    With a study's exact name, its detail: objective, outcomes, failures by reason, best
    parameters, storage. A queued or running study that no broker serves says so: `running (no
    broker: the broker on host:pid stopped 40s ago)`; with --json, it carries `broker`, the
    prefix's broker as read (`state`: serving, starting, stopped or none). With signing on, a
    study whose status the broker did not sign shows as `refused` (with --json: `"state":
    "refused"` and why in `error`), and its detail is an error. In JSON, a NaN or an infinity
    (a best value of inf) is the string "NaN", "Infinity" or "-Infinity". Reads only, through
    Redis: never starts a redis-server.
    """
    import fnmatch

    from optuna_rq.terminal.status_view import status_detail, status_lines

    options: GlobalOptions = ctx.obj
    states = {str(s) for s in state or []}
    client = read_client(options)
    broker = client.liveness()
    pattern = name is not None and any(c in name for c in "*?[")
    if name is not None and not pattern:
        one = client.require_status(name)
        if as_json:
            typer.echo(json_text(_as_json(one, broker), indent=2))
        else:
            typer.echo("\n".join(status_detail(one, client, broker)))
        return
    snapshots = [
        s
        for s in client.statuses()
        if (not states or _state_of(s) in states)
        and (name is None or fnmatch.fnmatchcase(s.name, name))
    ]
    if as_json:
        typer.echo(json_text([_as_json(s, broker) for s in snapshots], indent=2))
        return
    if not snapshots:
        typer.echo(f"no studies on prefix {options.prefix!r}", err=True)
        return
    typer.echo("\n".join(status_lines(snapshots, broker=broker)))
    for refused in (s for s in snapshots if isinstance(s, RefusedStatus)):
        typer.echo(refused.why, err=True)  # the `refused` of the lines above, in full
    note = broker.note()
    if note is not None and any(_state_of(s) in _MOVING and not _driven(s) for s in snapshots):
        typer.echo(note, err=True)  # the `(no broker)` of the lines above, in full


_MOVING = ("queued", "running")
"""The states a broker moves a study on from: without one, they stay as they are."""


def _state_of(s: StudyStatus | RefusedStatus) -> str:
    """The state `status` shows: the study's, or `refused`."""
    return REFUSED if isinstance(s, RefusedStatus) else s.state.value


def _driven(s: StudyStatus | RefusedStatus) -> bool:
    """Whether a remote Optimizer's process runs the study (no broker moves it)."""
    return not isinstance(s, RefusedStatus) and s.driven


def _as_json(s: StudyStatus | RefusedStatus, broker: BrokerLiveness) -> dict[str, Any]:
    """A study's status for `status --json`; a queued or running one with what moves it (an
    ended study's snapshot stays the same whatever it does): `broker`, or for a study a remote
    Optimizer runs `driver_liveness`, its process as judged by the Redis clock; a refused one
    as its name, `"state": "refused"`, and why in `error`."""
    if isinstance(s, RefusedStatus):
        return {"name": s.name, "state": _state_of(s), "error": s.why}
    if s.state.ended:
        return s.to_dict()
    if s.driven and broker.read_at_s is not None:
        from optuna_rq.protocol.liveness import judge_driver

        live = judge_driver(s, now_s=broker.read_at_s)
        return {**s.to_dict(), "driver_liveness": None if live is None else live.to_dict()}
    return {**s.to_dict(), "broker": broker.to_dict()}


def wait_command(
    ctx: typer.Context,
    name: StudyName,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout", min=0, metavar="SECONDS", help="Give up after this many seconds (exit 1)."
        ),
    ] = None,
    wait_for_broker: WaitForBroker = False,
) -> None:
    """Follow a study with a progress bar until it ends.

    Exit 0 when it finished with a complete trial; 1 when it was cancelled, failed, finished
    without one complete trial, or the timeout passed, or (with signing on) its status is not
    signed by the broker and the broker holds no such study; 3 when no broker serves the prefix
    (it died or stopped, or none started: see --wait-for-broker), or, for a study a remote
    Optimizer runs, when that Python process stopped (killed, or its machine lost). With
    signing on, a status the broker did not sign, or one of an earlier run of the study written
    back, is ignored: it waits for the broker's own.

    Ctrl-C stops following (exit 130); the study runs on.
    """
    options: GlobalOptions = ctx.obj
    client = read_client(options)
    raise typer.Exit(follow_exit(client, name, timeout_s=timeout, wait_for_broker=wait_for_broker))


def follow_exit(client: BrokerClient, name: str, **how: Any) -> int:
    """`follow(client, name, **how)`'s exit code; on Ctrl-C, after the bar's last state, a line
    saying that the study runs on and how to follow it again, and `EXIT_INTERRUPTED`."""
    from optuna_rq.terminal.progress import EXIT_INTERRUPTED, follow  # rich: for terminals

    try:
        return follow(client, name, **how)
    except KeyboardInterrupt:
        import shlex

        study, prefix = shlex.quote(name), shlex.quote(client.prefix)
        prefix = "" if client.prefix == DEFAULT_PREFIX else f" --prefix {prefix}"
        err_console().print(
            f"stopped following study {name!r}; it runs on: `optuna-rq{prefix} wait {study}` "
            f"follows it again, `optuna-rq{prefix} cancel {study}` stops it",
            markup=False,
            highlight=False,
            soft_wrap=True,  # a command to copy: the terminal wraps it, not a newline
        )
        return EXIT_INTERRUPTED
