"""`optuna-rq trials`, `best`, `delete` and `enqueue`: what users look for once a study runs.

`trials` reads the study's own storage (the URL its status names); `best` reads its status;
`delete` and `enqueue` are commands the broker applies, as every change to a study is.
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optuna_rq.cli_options import GlobalOptions, StudyName, make_client, read_client
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import StudyState
from optuna_rq.protocol.choices import StrChoice

if TYPE_CHECKING:
    from optuna_rq.protocol import StudyStatus

__all__ = [
    "OutputFormat",
    "TrialStateName",
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


class TrialStateName(StrChoice):
    """`trials --state`: Optuna's trial states, as `trials` shows them."""

    COMPLETE = "complete"
    PRUNED = "pruned"
    FAIL = "fail"
    RUNNING = "running"
    WAITING = "waiting"


def trials(
    ctx: typer.Context,
    name: _NAME,
    output: Annotated[
        OutputFormat, typer.Option("--format", "-f", help="json: a list of objects.")
    ] = OutputFormat.TABLE,
    state: Annotated[
        TrialStateName | None,
        typer.Option("--state", case_sensitive=False, help="Only trials in this state."),
    ] = None,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="URL",
            help="Read the trials from this storage URL rather than the one the study's "
            "status names (needed for a storage other than your default one when signing "
            "is off, and for a redis:// storage).",
        ),
    ] = None,
) -> None:
    """List a study's trials: number, state, value(s), parameters, duration, fail reason.

    Read from the study's storage, as optuna-dashboard reads it; never starts a redis-server.
    """
    import optuna

    from optuna_rq.connection import redact_url
    from optuna_rq.studies import open_storage

    options: GlobalOptions = ctx.obj
    client = read_client(options)
    status = client.require_status(name)
    if storage is None and status.state is StudyState.QUEUED:  # its storage is not known yet
        raise ConfigError(f"study {name!r} is queued: the broker has not taken it yet")
    url = storage or _storage_to_read(name, status.storage, options, signed=client.signer.enabled)
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(url))
    except KeyError as exc:
        raise ConfigError(f"study {name!r} has no trials in {redact_url(url)} yet") from exc
    rows = [_row(t) for t in study.get_trials(deepcopy=False)]
    if state is not None:
        rows = [r for r in rows if r["state"] == str(state)]
    typer.echo(_render(rows, output), nl=False)


def _storage_to_read(name: str, url: str, options: GlobalOptions, *, signed: bool) -> str:
    """The storage `trials` opens for study `name` whose status names `url`; ConfigError if it
    would open it on Redis's word alone. Whoever can write to Redis can write a status (unless
    the broker signs it), and opening a storage runs what it names: a path is created, a
    database server is connected to with options the URL sets (a MySQL `local_infile`), and
    Optuna's JournalRedis unpickles its snapshot. So a JournalRedis is opened only when the
    user names it (`--storage`); with signing off, so is any storage but the user's default."""
    from optuna_rq.connection import redact_url
    from optuna_rq.storage_policy import PICKLING_SCHEMES, StoragePolicy
    from optuna_rq.studies import default_storage_url

    shown = redact_url(url)
    if url == "memory":
        raise ConfigError(
            f"study {name!r} is in the broker's in-memory storage: only the broker can read "
            "its trials (`optuna-rq best` shows its best from the status)"
        )
    if url.partition("://")[0] in PICKLING_SCHEMES:
        raise ConfigError(
            f"study {name!r} is in {shown}, Optuna's JournalRedis, which unpickles what it "
            "loads: `trials` opens one only if you name it yourself, if you trust whoever can "
            f"write to that Redis (optuna-rq trials {name} --storage URL)"
        )
    if not signed and not StoragePolicy(default_storage_url(options.state())).allows(url):
        raise ConfigError(
            f"study {name!r}'s status says its trials are in {shown}; with signing off, a "
            "status is the word of whoever can write to Redis, so `trials` opens from it only "
            f"your default storage: if that storage is the study's, name it yourself "
            f"(optuna-rq trials {name} --storage URL)"
        )
    return url


def _row(trial: Any) -> dict[str, Any]:
    from optuna_rq.verdict import FAIL_REASON_ATTR

    duration = trial.duration.total_seconds() if trial.duration is not None else None
    row: dict[str, Any] = {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "values": trial.values,
        "params": dict(trial.params),
        "duration_s": duration,
        "fail_reason": trial.user_attrs.get(FAIL_REASON_ATTR),
    }
    return row


def _render(rows: list[dict[str, Any]], output: OutputFormat) -> str:
    if output is OutputFormat.JSON:
        return json.dumps(rows, indent=2, default=str) + "\n"
    params = sorted({p for row in rows for p in row["params"]})
    width = max((len(r["values"] or []) for r in rows), default=1) or 1
    value_cols = ["value"] if width == 1 else [f"value_{i}" for i in range(width)]
    header = ["number", "state", *value_cols, *params, "duration_s", "fail_reason"]
    table = []
    for row in rows:
        values = list(row["values"] or []) + [None] * (width - len(row["values"] or []))
        table.append(
            [
                row["number"],
                row["state"],
                *values,
                *(row["params"].get(p) for p in params),
                row["duration_s"],
                row["fail_reason"],
            ]
        )
    if output is OutputFormat.CSV:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(header)
        writer.writerows([["" if v is None else v for v in line] for line in table])
        return out.getvalue()
    cells = [header, *([_cell(v) for v in line] for line in table)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    return "".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip() + "\n"
        for line in cells
    )


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.6g}"
    return str(value)


def best(
    ctx: typer.Context,
    name: _NAME,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Print a study's best value and parameters (a multi-objective study: its Pareto front).

    Exit 1 if no trial completed yet.
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
            typer.echo(json.dumps({"directions": status.directions, "pareto_front": front}))
            return
        typer.echo(f"Pareto front of {len(front)} trials ({', '.join(status.directions)}):")
        for point in front:
            values = ", ".join(_cell(v) for v in point["values"])
            typer.echo(f"  [{values}]  {_params(point['params'])}")
        return
    if as_json:
        typer.echo(json.dumps({"value": status.best_value, "params": status.best_params}))
        return
    typer.echo(f"best value {_cell(status.best_value)}")
    assert isinstance(status.best_params, dict)
    for param, value in status.best_params.items():
        typer.echo(f"  {param} = {value!r}")


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
    """Make the broker forget a study: its spec and its status.

    Its trials stay in its Optuna storage (optuna-dashboard still shows them; resubmitting the
    name continues them) unless --purge. A running study is refused unless --force, and so is
    one whose status the broker did not sign (with signing on: it may be running).
    """
    import time

    from optuna_rq.protocol import Delete

    options: GlobalOptions = ctx.obj
    client = make_client(options)
    try:
        status: StudyStatus | None = client.require_status(name)
    except ProtocolError as exc:  # not the broker's: what it says is unknown, running maybe
        if not force:
            raise ProtocolError(f"{exc} (`optuna-rq delete --force {name}` deletes it)") from None
        status = None
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
            "names to values, e.g. [{x: 1.5, model.lr: 0.01}]."
        ),
    ],
) -> None:
    """Run known parameter sets next, before any sampled trial, each exactly once.

    The broker stores them in the study's storage as WAITING trials (Optuna's enqueue_trial),
    a slice at a time between its other work, so they survive a broker restart; a set already
    enqueued or run is skipped. They count against --n-trials like any trial.
    """
    param_sets = load_enqueue_file(file)
    client = make_client(ctx.obj)
    status = client.require_status(name)
    if status.state.ended:
        raise ConfigError(f"study {name!r} is {status.state.value}: nothing would run them")
    client.send(*client.enqueue_commands(name, param_sets))
    typer.echo(f"enqueued {len(param_sets)} parameter sets for study {name!r}", err=True)


def load_enqueue_file(path: Path) -> list[dict[str, Any]]:
    """The parameter sets in `path`: a YAML/JSON list of mappings (one mapping alone is taken as
    a list of one); ConfigError naming the file otherwise."""
    import yaml

    from optuna_rq.protocol.codec import check_params

    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read parameter-set file {str(path)!r}: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"parameter-set file {str(path)!r} is not valid YAML: {exc}") from exc
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
