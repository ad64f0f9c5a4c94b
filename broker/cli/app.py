"""The `optuna-rq` command. Thin: it parses, validates, and hands over to the library.

Exit codes: 0 done, 1 a runtime error (Redis unreachable, a module that does not import),
2 a usage error (a bad option value), 3 (`wait`, `submit --wait`) no broker serves the prefix,
130 interrupted (Ctrl-C). Errors print one line, no traceback (`--debug` shows it, but for a
usage error). Every input is checked before anything connects or starts a server.

The app is made of `cli_command`'s classes: readable help, and the global options (`--redis-url`,
`--prefix`...) accepted after the command as well as before it.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from optuna_rq.cli.dashboard_command import dashboard
from optuna_rq.cli.field_flags import shown
from optuna_rq.cli.key_commands import keys
from optuna_rq.cli.options import (
    GlobalOptions,
    StudyName,
    WaitForBroker,
    command_client,
    global_options,
    make_client,
    read_client,
)
from optuna_rq.cli.output import err_console, json_text
from optuna_rq.cli.parsing import App
from optuna_rq.cli.redis_command import redis_app
from optuna_rq.cli.serve_commands import broker, workers
from optuna_rq.cli.study_commands import best, delete, enqueue, load_enqueue_file, trials
from optuna_rq.errors import ConfigError, OptunaRQError
from optuna_rq.plumbing.locations import DEFAULT_PREFIX
from optuna_rq.protocol import DEFAULT_QUEUE, Direction, Pruner, Sampler
from optuna_rq.protocol.status import RefusedStatus
from optuna_rq.terminal.status_view import REFUSED, ShownState

if TYPE_CHECKING:
    from optuna_rq.client import BrokerClient
    from optuna_rq.protocol import StudyStatus
    from optuna_rq.protocol.liveness import BrokerLiveness

app = App(
    name="optuna-rq",
    help="Run Optuna studies on RQ workers: a broker asks, workers run trials, results are "
    "told.\n\nThe options below go before the command or after it.",
    # Bare `optuna-rq` shows the help from the callback (exit 2), not click's NoArgsIsHelpError.
    invoke_without_command=True,
    no_args_is_help=False,
    pretty_exceptions_enable=False,
    # Plain click help: flags shown as flags (not `--wait <bool>`), docstring paragraphs
    # reflowed as paragraphs, every option's environment variable listed.
    rich_markup_mode=None,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)

app.callback()(global_options)


def _default_study_name(objective: str) -> str:
    function = objective.partition(":")[2] or "study"
    return f"{function}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def submit(
    ctx: typer.Context,
    objective: Annotated[str, typer.Argument(help="The objective, as package.module:function.")],
    n_trials: Annotated[
        int,
        typer.Option("--n-trials", min=1, metavar="N", help="Trials to run in all (the budget)."),
    ],
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", min=1, metavar="N", help="At most this many trials at once."),
    ],
    space: Annotated[
        Path | None,
        typer.Option("--space", metavar="FILE", help="A YAML or JSON search-space file."),
    ] = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            metavar="NAME=VALUE",
            help="A fixed input, or a suggestion like "
            "'x={type: float, low: 0, high: 1}'. Dotted names nest. Repeatable.",
        ),
    ] = None,
    enqueue: Annotated[
        Path | None,
        typer.Option(
            "--enqueue",
            metavar="FILE",
            help="A YAML or JSON file of parameter sets (a list of NAME: VALUE mappings) to run "
            "first, each exactly once: see `optuna-rq enqueue`.",
        ),
    ] = None,
    study_name: Annotated[
        str | None,
        typer.Option("--study-name", metavar="NAME", help="Default: FUNCTION-DATE-TIME."),
    ] = None,
    directions: Annotated[
        list[Direction] | None,
        typer.Option(
            "--direction",
            help="Repeat it for a multi-objective study, once per value the objective returns. "
            "Default: minimize.",
        ),
    ] = None,
    sampler: Annotated[Sampler, typer.Option("--sampler", help="Optuna's sampler.")] = Sampler.TPE,
    seed: Annotated[int | None, typer.Option("--seed", metavar="N", help="Sampler seed.")] = None,
    constant_liar: Annotated[
        bool | None,
        typer.Option(
            "--constant-liar/--no-constant-liar",
            help="TPE only: count running trials as bad ones, so parallel trials spread out. "
            "Default: on when --concurrency is above 1.",
            show_default=False,
        ),
    ] = None,
    ask_ahead: Annotated[
        int,
        typer.Option(
            "--ask-ahead",
            min=0,
            metavar="N",
            help="Trials to sample before a slot frees, sent the moment one does: less idle "
            "time between trials, but the sampler sees that many more running (and at "
            "--concurrency 1 a seed no longer gives study.optimize's params).",
        ),
    ] = 0,
    pruner: Annotated[
        Pruner, typer.Option("--pruner", help="Optuna's pruner (none: never prune).")
    ] = Pruner.NONE,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="URL",
            help="This study's Optuna storage URL (checked here before anything is sent). "
            "Default: the broker's.",
        ),
    ] = None,
    trial_timeout: Annotated[
        float | None,
        typer.Option(
            "--trial-timeout",
            metavar="SECONDS",
            help="Whole seconds before a trial is stopped (FAIL timeout).",
        ),
    ] = None,
    max_retries: Annotated[
        int,
        typer.Option(
            "--max-retries", min=0, metavar="N", help="Re-runs of a trial whose worker was lost."
        ),
    ] = 2,
    priority: Annotated[
        float,
        typer.Option(
            "--priority",
            min=0.001,
            metavar="WEIGHT",
            help="Weight in sharing workers with other studies.",
        ),
    ] = 1.0,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            metavar="SECONDS",
            help="Stop condition: seconds of wall clock from submission.",
        ),
    ] = None,
    target: Annotated[
        float | None,
        typer.Option(
            "--target", metavar="VALUE", help="Stop condition: once the best value reaches VALUE."
        ),
    ] = None,
    patience: Annotated[
        int | None,
        typer.Option(
            "--patience",
            metavar="N",
            help="Stop condition: N completed trials without improvement.",
        ),
    ] = None,
    queue: Annotated[
        str,
        typer.Option(
            "--queue",
            "-q",
            metavar="NAME",
            help="The resource class its trials run in: only workers started with "
            "--queue NAME (and --import of its module) take them.",
        ),
    ] = DEFAULT_QUEUE,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the study until it ends.")] = False,
    wait_for_broker: WaitForBroker = False,
) -> None:
    """Submit a study to the broker and print its name.

    Everything is checked before anything is sent: the objective path, the space file, every
    suggestion, every number, the limits of a message, and, if the objective imports here (from
    the current directory, as workers import it), that it takes the space's inputs.
    Resubmitting a study's definition runs it on to the new --n-trials (an ended one too);
    another definition under its name is refused.

    With --wait, exit as `optuna-rq wait` does: 0 finished with a complete trial, 1 not, 3 no
    broker serves the prefix (unless --wait-for-broker).
    """
    from rich.markup import escape

    from optuna_rq.cli.input_checks import check_storage_url, check_trial_timeout
    from optuna_rq.optimizer_run.objective_checks import check_inputs_here
    from optuna_rq.protocol import StudySpec
    from optuna_rq.space.space_files import load_space_file, merge_param, parse_param, space_to_data

    options: GlobalOptions = ctx.obj
    timeout_s = check_trial_timeout(trial_timeout)
    if storage is not None:
        check_storage_url(storage)
    to_enqueue = load_enqueue_file(enqueue) if enqueue is not None else []
    data = space_to_data(load_space_file(space)) if space is not None else {}
    for text in params or []:
        path, value = parse_param(text)
        merge_param(data, path, value)
    spec = StudySpec(
        name=study_name or _default_study_name(objective),
        objective=objective,
        space=data,
        n_trials=n_trials,
        concurrency=concurrency,
        directions=directions or [Direction.MINIMIZE],
        sampler=sampler,
        seed=seed,
        constant_liar=constant_liar,
        ask_ahead=ask_ahead,
        pruner=pruner,
        storage=storage,
        trial_timeout_s=timeout_s,
        max_retries=max_retries,
        priority=priority,
        timeout_s=timeout,
        target=target,
        patience=patience,
        queue=queue,
    )
    unchecked = check_inputs_here(objective, spec.space)
    if unchecked is not None:
        err_console().print(f"[yellow]note:[/] {escape(unchecked)}")
    client = make_client(options)
    client.submit(spec, enqueue=to_enqueue)
    typer.echo(spec.name)
    broker = client.liveness()
    if not broker.serves:
        err_console().print(
            f"[yellow]{escape(broker.note() or '')}:[/] the study waits until one runs"
        )
    if wait:
        raise typer.Exit(
            _follow(
                client, spec.name, timeout_s=None, submitted=spec, wait_for_broker=wait_for_broker
            )
        )


@app.command()
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

    from optuna_rq.terminal.progress import status_detail, status_lines

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


@app.command("wait")
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
    raise typer.Exit(_follow(client, name, timeout_s=timeout, wait_for_broker=wait_for_broker))


def _follow(client: BrokerClient, name: str, **how: Any) -> int:
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


@app.command()
def cancel(ctx: typer.Context, name: StudyName) -> None:
    """Cancel a study: no new trials; queued and running ones end FAIL (cancelled).

    A command the broker applies, sent through Redis: it never starts a redis-server.
    """
    client = command_client(ctx.obj)
    client.require_status(name)
    client.cancel(name)
    err_console().print(f"cancelling study {name!r}")


@app.command("set")
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


@app.command()
def demo(
    n_trials: Annotated[
        int, typer.Option("--n-trials", min=1, metavar="N", help="Trials to run.")
    ] = 60,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, max=64, metavar="N", help="Worker processes to start."),
    ] = 2,
) -> None:
    """Run the bundled example study on a private embedded Redis, a broker and two workers.

    Shows the progress, prints the best trial, and leaves nothing running.
    """
    from optuna_rq.cli.demo import run_demo

    run_demo(n_trials=n_trials, workers=workers)


# Defined in their own modules; listed after the commands above in --help.
app.command()(workers)
app.command()(broker)
app.command()(trials)
app.command()(best)
app.command()(delete)
app.command()(enqueue)
app.command()(keys)
app.command()(dashboard)
app.add_typer(redis_app)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app; every error becomes one line on stderr and an exit code
    (2 for a usage error, 1 for any other). With --debug, an error that is not a usage error
    shows its traceback: a usage error says all there is (the input and the fix)."""
    args = sys.argv[1:] if argv is None else argv
    debug = "--debug" in args
    try:
        # Not standalone: errors come back to us, to be printed as one line. Typer >= 0.29
        # raises its own (vendored) click's errors, all `typer.TyperException`s, never
        # `click.ClickException`s: pyproject pins the typer that does so.
        code = app(args=args, prog_name="optuna-rq", standalone_mode=False)
    except OptunaRQError as exc:
        _fail(exc, shown(exc), code=exc.exit_code, debug=debug)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (typer.Abort, KeyboardInterrupt):
        from optuna_rq.terminal.progress import EXIT_INTERRUPTED

        typer.echo("Aborted.", err=True)
        sys.exit(EXIT_INTERRUPTED)
    except typer.TyperException as exc:  # click's usage errors: a bad option, a missing one...
        _fail(exc, _usage_message(exc), code=exc.exit_code, debug=debug)
    except Exception as exc:  # a bug, or a library's error we did not expect: still one line
        _fail(
            exc,
            f"unexpected {type(exc).__name__}: {exc}"
            + ("" if debug else " (--debug shows where; please report it)"),
            code=1,
            debug=debug,
        )
    sys.exit(code if isinstance(code, int) else 0)


USAGE_ERROR = 2
"""The exit code of a usage error (a ConfigError, click's errors): the input is wrong."""


def _usage_message(exc: typer.TyperException) -> str:
    """The error on one line, with where to look: `... (see 'optuna-rq submit --help')`."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    # typer checks values with pydantic, whose messages start with the kind of error
    message = message.replace(": Value error, ", ": ")
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and ctx.command.get_help_option(ctx) is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _fail(exc: BaseException, message: str, *, code: int, debug: bool) -> None:
    if debug and code != USAGE_ERROR:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"Error: {message}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
