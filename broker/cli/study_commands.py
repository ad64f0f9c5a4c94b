"""`optuna-rq trials`, `best`, `delete` and `enqueue`: what users look for once a study runs.

All of them work from any machine that reaches Redis, through Redis and the broker alone:
`trials` reads the trials the broker publishes (never the study's storage, whose path or
server is the broker's), `best` reads the study's status, and `delete` and `enqueue` are
commands the broker applies, as every change to a study is; `enqueue` says what the broker did
with the sets, from its receipts. None starts a redis-server or creates a file.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optuna_rq.cli.options import GlobalOptions, StudyName, command_client, read_client
from optuna_rq.cli.output import json_text
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol.choices import StrChoice
from optuna_rq.terminal.status_view import REFUSED

if TYPE_CHECKING:
    from optuna_rq.protocol import BulkReceipt, StudyStatus

__all__ = [
    "OutputFormat",
    "ShownTrialState",
    "best",
    "delete",
    "enqueue",
    "load_enqueue_file",
    "trials",
]

_NAME = StudyName


class OutputFormat(StrChoice):
    """`trials --format`."""

    TABLE = "table"
    JSON = "json"  # a list of objects
    CSV = "csv"


class ShownTrialState(StrChoice):
    """`trials --state`: a published trial's state (Optuna's, lower-case), or `refused`."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAIL = "fail"
    RUNNING = "running"
    REFUSED = "refused"


def trials(
    ctx: typer.Context,
    name: _NAME,
    output: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="json: a list of objects.")
    ] = OutputFormat.TABLE,
    state: Annotated[
        ShownTrialState | None,
        typer.Option(
            "--state",
            case_sensitive=False,
            help="Only trials in this state (refused: entries the broker did not sign).",
        ),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="URL",
            help="Read the trials from this Optuna storage URL, one this machine reaches, rather "
            "than from what the broker publishes (no Redis is read). Nothing is created: a "
            "journal or SQLite file must exist.",
        ),
    ] = None,
) -> None:
    """List a study's trials: number, state, value(s), parameters, user attributes, the last
    intermediate value(s) reported, duration, fail reason (json and csv: every intermediate
    value, times, error, attempt).

    Read from what the broker publishes in Redis as each trial is sent and ends, so it works on
    any machine that reaches Redis; it never opens the study's storage (a path or a server of
    the broker's), creates no file and never starts a redis-server. Parameter sets enqueued and
    not yet run are not listed. With signing on, an entry the broker did not sign shows as
    `refused`, and why on stderr. A multi-objective study's intermediate values are the lists
    its objective reported (`trial.report(values, step)`). In JSON, a NaN or an infinity is
    the string "NaN", "Infinity" or "-Infinity".
    """
    from optuna_rq.cli.output import render_trials, trial_row
    from optuna_rq.protocol import RefusedTrial

    wanted = None if state is None else str(state)
    if storage is not None:
        entries: list[Any] = _stored_trials(name, storage)
    else:
        client = read_client(ctx.obj)
        status = client.require_status(name)
        entries = client.trials(name, driven=status.driven)
        _say_unpublished(status, entries)
    rows = [trial_row(entry) for entry in entries]
    if wanted is not None:
        rows = [row for row in rows if row["state"] == wanted]
    typer.echo(render_trials(rows, str(output)), nl=False)
    for entry in entries:
        if isinstance(entry, RefusedTrial) and wanted in (None, REFUSED):
            typer.echo(entry.why, err=True)  # the `refused` rows above, in full


def _stored_trials(name: str, url: str) -> list[Any]:
    """Study `name`'s trials read from the storage at `url` (`--storage`), as the broker would
    publish them (unbounded: the storage holds it all)."""
    import optuna

    from optuna_rq.dispatch.publication import summary_of
    from optuna_rq.plumbing.locations import redact_url
    from optuna_rq.storage.storage_access import open_storage_to_read

    try:
        study = optuna.load_study(study_name=name, storage=open_storage_to_read(url))
    except KeyError as exc:
        raise ConfigError(f"study {name!r} is not in {redact_url(url)}") from exc
    multi = len(study.directions) > 1
    return [summary_of(t, multi=multi) for t in study.get_trials(deepcopy=False)]


def _say_unpublished(status: StudyStatus, entries: list[Any]) -> None:
    """On stderr, if an ended study's status counts more ended trials than the broker published
    (it ended under an older broker, which published no trials: the broker publishes them after
    its next start)."""
    from optuna_rq.protocol import TrialSummary

    counted = status.complete + status.pruned + status.failed
    ended = sum(1 for e in entries if isinstance(e, TrialSummary) and e.state.ended)
    if status.state.ended and ended < counted:
        typer.echo(
            f"study {status.name!r}: the broker published {ended} of its {counted} ended "
            "trials (a study that ended before brokers published trials is published after "
            f"the broker's next start); `optuna-rq trials {status.name} --storage URL` reads "
            "its storage, if this machine reaches it",
            err=True,
        )


def best(
    ctx: typer.Context,
    name: _NAME,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print a study's best value and parameters (a multi-objective study: its Pareto front).

    Read from the study's status in Redis (any machine that reaches it). Exit 1 if no trial
    completed yet. In JSON, a NaN or an infinity is the string "NaN", "Infinity" or
    "-Infinity".
    """
    options: GlobalOptions = ctx.obj
    status = read_client(options).require_status(name)
    if status.best_params is None:
        typer.echo(f"study {name!r} has no complete trial yet ({status.state.value})", err=True)
        raise typer.Exit(1)
    if status.multi_objective:
        front: list[dict[str, Any]] = [
            {"values": values, "params": params}
            for values, params in zip(status.best_values or [], status.best_params, strict=False)
        ]
        if as_json:
            typer.echo(json_text({"directions": status.directions, "pareto_front": front}))
            return
        typer.echo(f"Pareto front of {len(front)} trials ({', '.join(status.directions)}):")
        for point in front:
            values = ", ".join(_number(v) for v in point["values"])
            typer.echo(f"  [{values}]  {_params(point['params'])}")
        return
    if as_json:
        typer.echo(json_text({"value": status.best_value, "params": status.best_params}))
        return
    typer.echo(f"best value {_number(status.best_value)}")
    assert isinstance(status.best_params, dict)
    for param, value in status.best_params.items():
        typer.echo(f"  {param} = {value!r}")


def _number(value: float | None) -> str:
    if value is None:
        return "-"
    return "nan" if math.isnan(value) else f"{value:.6g}"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in params.items())


def delete(
    ctx: typer.Context,
    name: _NAME,
    force: Annotated[
        bool, typer.Option("--force", help="Delete a running study too (it is cancelled first).")
    ] = False,
    purge: Annotated[
        bool,
        typer.Option(
            "--purge", help="Also delete its trials from its Optuna storage (default: kept)."
        ),
    ] = False,
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0,
            metavar="SECONDS",
            help="Seconds to wait for the broker to confirm.",
        ),
    ] = 30.0,
) -> None:
    """Make the broker forget a study: its spec, its status and the trials it published.

    Its trials stay in its Optuna storage (optuna-dashboard still shows them; resubmitting the
    name continues them, and publishes them again) unless --purge. A running study is refused
    unless --force, and so is one whose status the broker did not sign (with signing on: it
    may be running). A command the broker applies, sent through Redis: it never starts a
    redis-server. A study a remote Optimizer ran is forgotten here, without a broker, once that
    run ended or its process died; its trials stay in that Optimizer's study.
    """
    import time

    from optuna_rq.protocol import Delete

    options: GlobalOptions = ctx.obj
    client = command_client(options)
    try:
        status: StudyStatus | None = client.require_status(name)
    except ProtocolError as exc:  # not the broker's: what it says is unknown, running maybe
        if not force:
            raise ProtocolError(f"{exc} (`optuna-rq delete --force {name}` deletes it)") from None
        status = None
    if status is not None and status.driven:
        if purge:
            raise ConfigError(
                f"study {name!r} was run by the Optimizer on {status.driver}: its trials are in "
                "that Optimizer's study, which only its process reaches (optuna.delete_study "
                "there); `delete` without --purge forgets its status"
            )
        client.delete_driven(status)
        typer.echo(f"deleted study {name!r} (run by the Optimizer on {status.driver})")
        return
    if status is not None and not status.state.ended and not force:
        raise ConfigError(
            f"study {name!r} is {status.state.value}: `optuna-rq cancel {name}` first, "
            "or delete --force"
        )
    client.send(Delete(study=name, force=force, purge=purge))
    broker = client.liveness()
    if not broker.serves:  # none would confirm it: a dead broker's lock can outlive it 10 s
        typer.echo(
            f"study {name!r} will be deleted when a broker runs on {client.prefix!r} "
            f"({broker.note()})"
        )
        return
    deadline = time.monotonic() + timeout
    while client.has_status(name):
        if time.monotonic() >= deadline:
            typer.echo(f"the broker has not deleted study {name!r} yet (see its log)", err=True)
            raise typer.Exit(1)
        time.sleep(0.1)
    kept = "" if purge or status is None else f"; its trials are kept in {status.storage}"
    typer.echo(f"deleted study {name!r}{kept}")


def enqueue(
    ctx: typer.Context,
    name: _NAME,
    file: Annotated[
        Path,
        typer.Argument(
            help="YAML or JSON: a list of parameter sets, each a mapping of dotted parameter "
            "names to values, e.g. [{x: 1.5, model.lr: 0.01}].",
        ),
    ],
    timeout: Annotated[
        float,
        typer.Option(
            "--timeout",
            min=0,
            help="Seconds to wait for the broker to say how many sets were new (it stores them "
            "a slice at a time: 100,000 sets take about 30 s).",
        ),
    ] = 60.0,
) -> None:
    """Run known parameter sets next, before any sampled trial, each exactly once.

    The broker stores them in the study's storage as WAITING trials (Optuna's enqueue_trial),
    a slice at a time between its other work, so they survive a broker restart; a set already
    enqueued or run is skipped. They count against --n-trials like any trial. Prints how many
    were new and how many already enqueued or run, as the broker reports them; exit 1 if some
    were not stored (the study ended first, or its storage refused them). Sent through Redis: it
    never starts a redis-server.
    """
    import time

    param_sets = load_enqueue_file(file)
    client = command_client(ctx.obj)
    status = client.require_status(name)
    if status.state.ended:
        raise ConfigError(f"study {name!r} is {status.state.value}: nothing would run them")
    commands = client.enqueue_commands(name, param_sets)
    client.send(*commands)
    total = f"{len(param_sets)} parameter sets"
    broker = client.liveness()
    if not broker.serves:  # nobody to report back: say what was done, and what will be
        typer.echo(
            f"study {name!r}: {total} sent; a broker stores them when one runs on "
            f"{client.prefix!r}, skipping those already enqueued or run ({broker.note()})"
        )
        return
    deadline = time.monotonic() + timeout
    receipts = client.receipts(commands)
    while len(receipts) < len(commands) and time.monotonic() < deadline:
        time.sleep(0.1)
        receipts = client.receipts(commands)
    typer.echo(_enqueued(name, total, list(receipts.values()), done=len(receipts) == len(commands)))
    if any(r.dropped or r.refused for r in receipts.values()):
        raise typer.Exit(1)


def _enqueued(name: str, total: str, receipts: list[BulkReceipt], *, done: bool) -> str:
    """What `enqueue` says the broker did with the sets: from its receipts, all of them if
    `done`, else those it is done with so far."""
    new = sum(r.new for r in receipts)
    existing = sum(r.existing for r in receipts)
    counts = [f"{new} new", f"{existing} already enqueued or run"]
    refused = sum(r.refused for r in receipts)
    if refused:
        counts.append(f"{refused} refused by its storage (see the broker's log)")
    earlier = sum(r.earlier for r in receipts)
    if earlier:
        counts.append(f"{earlier} stored by the broker before it restarted")
    dropped = sum(r.dropped for r in receipts)
    if dropped:
        whys = sorted({r.why for r in receipts if r.dropped and r.why})
        counts.append(f"{dropped} not stored ({'; '.join(whys) or 'the study stopped'})")
    if done:
        return f"study {name!r}: {total}: {', '.join(counts)}"
    applied = sum(r.items for r in receipts)
    so_far = f" (done with {applied} so far: {', '.join(counts)})" if applied else ""
    return (
        f"study {name!r}: {total} sent; the broker stores them{so_far}, and its log says when "
        "it is done"
    )


def load_enqueue_file(path: Path) -> list[dict[str, Any]]:
    """The parameter sets in `path`: a YAML/JSON list of mappings (one mapping alone is taken as
    a list of one); ConfigError naming the file otherwise."""
    from optuna_rq.protocol.codec import check_params
    from optuna_rq.space.space_files import load_data_file

    data = load_data_file(path, what="parameter-set file")
    if isinstance(data, dict):
        data = [data]
    if (
        not isinstance(data, list)
        or not data
        or not all(isinstance(item, dict) and item for item in data)
    ):
        raise ConfigError(
            f"parameter-set file {str(path)!r}: expected a non-empty list of mappings like "
            "[{x: 1.5, depth: 4}]"
        )
    for i, item in enumerate(data):
        if not all(isinstance(k, str) for k in item):
            raise ConfigError(f"parameter-set file {str(path)!r}: set {i} has a non-text name")
        try:
            check_params(item)
        except Exception as exc:
            raise ConfigError(f"parameter-set file {str(path)!r}: set {i}: {exc}") from exc
    return data
