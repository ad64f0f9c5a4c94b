"""The `optuna-rq` command. Thin: it parses, validates, and hands over to the library.

Exit codes: 0 done, 1 a runtime error (Redis unreachable, a module that does not import),
2 a usage error (a bad option value). Errors print one line, no traceback (`--debug` shows it).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from optuna_rq.cli_options import (
    GlobalOptions,
    configure_logging,
    connect_redis,
    global_options,
    make_client,
)
from optuna_rq.errors import ConfigError, OptunaRQError
from optuna_rq.protocol import DEFAULT_LEASE_TTL_S, DEFAULT_QUEUE, Signer

app = typer.Typer(
    name="optuna-rq",
    help="Run Optuna studies on RQ workers: a broker asks, workers run trials, results are told.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


app.callback()(global_options)

_out = Console()
_err = Console(stderr=True)


@app.command()
def workers(
    ctx: typer.Context,
    modules: Annotated[
        list[str],
        typer.Option(
            "--import",
            "-i",
            help="A module whose objectives these workers run (repeat for several). "
            "Only objectives defined in these modules are ever imported.",
        ),
    ],
    count: Annotated[
        int | None,
        typer.Option(
            "--count", "-n", min=1, help="Worker processes. Default: 1, or one per --gpus set."
        ),
    ] = None,
    queues: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            "-q",
            help="A resource class to take trials of (studies submitted with --queue NAME); "
            "repeat for several, first served first. Default: default.",
        ),
    ] = None,
    paths: Annotated[
        list[Path] | None,
        typer.Option(
            "--path",
            "-P",
            help="A directory to import the --import modules from (repeatable). "
            "The current directory always is one.",
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            help="GPUs to pin worker processes to: a count (4) or device ids (0,1,2,3). "
            "Each worker process gets its own CUDA_VISIBLE_DEVICES, kept across restarts.",
        ),
    ] = None,
    gpus_per_trial: Annotated[
        int, typer.Option("--gpus-per-trial", min=1, help="GPUs each worker process gets.")
    ] = 1,
    autoscale: Annotated[
        str | None,
        typer.Option(
            "--autoscale",
            metavar="MIN,MAX",
            help="Grow to MAX worker processes while studies on these queues want them, "
            "shrink to MIN when idle (only idle workers are stopped).",
        ),
    ] = None,
    scale_down_after: Annotated[
        float,
        typer.Option(
            "--scale-down-after",
            min=0,
            help="With --autoscale: seconds a worker process stays idle before it is retired.",
        ),
    ] = 30.0,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING or ERROR.")
    ] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            help="Serve Prometheus metrics: worker i listens on PORT + i.",
        ),
    ] = None,
    lease_ttl: Annotated[
        float,
        typer.Option(
            "--lease-ttl",
            envvar="OPTUNA_RQ_LEASE_TTL",
            min=0.5,
            help="Seconds a running trial's lease outlives the worker that stops renewing it: "
            "how soon the broker notices a killed or frozen worker and retries its trial.",
        ),
    ] = DEFAULT_LEASE_TTL_S,
    isolation: Annotated[
        str,
        typer.Option(
            "--isolation",
            help="process: each worker process runs trials one after another (fastest). "
            "fork: a fresh fork per trial, as plain RQ does (nothing leaks between trials).",
        ),
    ] = "process",
) -> None:
    """Start COUNT worker processes that run trials of objectives from the --import modules.

    They take only trials of those modules, from the --queue resource classes, first served
    first: `--queue gpu --queue default` takes GPU trials before default ones.

    SIGTERM or Ctrl-C stops them gracefully: each finishes its running trial first. A second
    one stops them at once; the broker retries their trials elsewhere.
    """
    from optuna_rq.workers.autoscale import parse_autoscale
    from optuna_rq.workers.gpus import device_sets
    from optuna_rq.workers.pool import WorkerPool, WorkerSettings

    options: GlobalOptions = ctx.obj
    signer = Signer.from_env()
    level = configure_logging(log_level)
    devices = None if gpus is None else device_sets(gpus, gpus_per_trial)
    if gpus is None and gpus_per_trial != 1:
        raise ConfigError("--gpus-per-trial needs --gpus (the devices to share out)")
    if autoscale is not None and count is not None:
        raise ConfigError("give --count or --autoscale MIN,MAX, not both")
    for path in paths or []:
        if not path.is_dir():
            raise ConfigError(f"--path {str(path)!r} is not a directory")
    url, _connection = connect_redis(options)
    settings = WorkerSettings(
        redis_url=url,
        prefix=options.prefix,
        queues=tuple(queues or [DEFAULT_QUEUE]),
        paths=(*(str(p.resolve()) for p in paths or []), str(Path.cwd())),
        gpus=devices,
        autoscale=None if autoscale is None else parse_autoscale(autoscale),
        scale_down_after_s=scale_down_after,
        modules=tuple(modules),
        count=count or (len(devices) if devices else 1),
        log_level=level,
        secret=signer.secret,
        max_message_bytes=signer.max_message_bytes,
        metrics_port=metrics_port,
        lease_ttl_s=lease_ttl,
        isolation=isolation,
    )
    raise typer.Exit(WorkerPool(settings).run())


@app.command()
def broker(
    ctx: typer.Context,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            help="Default Optuna storage for studies that name none: sqlite:///..., "
            "postgresql://..., journal:///path, or memory. "
            "Default: a journal file under the state directory.",
            show_default=False,
        ),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="DEBUG, INFO, WARNING.")] = "INFO",
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="Serve Prometheus metrics on this port.", min=1),
    ] = None,
) -> None:
    """Run the broker daemon in the foreground: it serves every study submitted on this prefix.

    One broker per prefix. SIGTERM or Ctrl-C stops it gracefully; running trials go on, and a
    restarted broker tells their results.
    """
    from optuna_rq.connection import state_dir
    from optuna_rq.daemon import BrokerSettings, Daemon
    from optuna_rq.studies import default_storage_url, open_storage

    options: GlobalOptions = ctx.obj
    configure_logging(log_level)
    storage_url = storage or default_storage_url(state_dir())
    open_storage(storage_url)  # a URL Optuna rejects stops us here, before any study
    _url, connection = connect_redis(options)
    settings = BrokerSettings(prefix=options.prefix, storage=storage_url)
    metrics = None
    if metrics_port is not None:
        from optuna_rq.metrics import BrokerMetrics

        metrics = BrokerMetrics()
        metrics.serve(metrics_port)
    daemon = Daemon(connection, settings, Signer.from_env(), metrics)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger("optuna_rq.broker").info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.run(stop)


def _default_study_name(objective: str) -> str:
    function = objective.partition(":")[2] or "study"
    return f"{function}-{time.strftime('%Y%m%d-%H%M%S')}"


@app.command()
def submit(
    ctx: typer.Context,
    objective: Annotated[str, typer.Argument(help="The objective, as package.module:function.")],
    n_trials: Annotated[int, typer.Option("--n-trials", help="Trials to run in all.")],
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="At most this many trials at once.")
    ],
    space: Annotated[
        Path | None, typer.Option("--space", help="A YAML or JSON search-space file.")
    ] = None,
    params: Annotated[
        list[str] | None,
        typer.Option(
            "--param",
            help="NAME=VALUE: a fixed input, or a suggestion like "
            "'x={type: float, low: 0, high: 1}'. Dotted names nest. Repeatable.",
        ),
    ] = None,
    study_name: Annotated[
        str | None, typer.Option("--study-name", help="Default: FUNCTION-DATE-TIME.")
    ] = None,
    directions: Annotated[
        list[str] | None,
        typer.Option("--direction", help="minimize or maximize; repeat for multi-objective."),
    ] = None,
    sampler: Annotated[
        str, typer.Option("--sampler", help="random, tpe, cmaes, nsgaii, gp or qmc.")
    ] = "tpe",
    seed: Annotated[int | None, typer.Option("--seed", help="Sampler seed.")] = None,
    pruner: Annotated[
        str, typer.Option("--pruner", help="none, median, hyperband or successive-halving.")
    ] = "none",
    storage: Annotated[
        str | None, typer.Option("--storage", help="This study's Optuna storage URL.")
    ] = None,
    trial_timeout: Annotated[
        float | None, typer.Option("--trial-timeout", help="Seconds before a trial is stopped.")
    ] = None,
    max_retries: Annotated[
        int, typer.Option("--max-retries", help="Re-runs of a trial whose worker was lost.")
    ] = 2,
    priority: Annotated[
        float, typer.Option("--priority", help="Weight in sharing workers with other studies.")
    ] = 1.0,
    queue: Annotated[
        str,
        typer.Option(
            "--queue",
            "-q",
            help="The resource class its trials run in: only workers started with "
            "--queue NAME (and --import of its module) take them.",
        ),
    ] = DEFAULT_QUEUE,
    wait: Annotated[bool, typer.Option("--wait", help="Follow the study until it ends.")] = False,
) -> None:
    """Submit a study to the broker and print its name.

    Everything is checked before anything is sent: the objective path, the space file, every
    suggestion, every number. Resubmitting an existing study name continues that study.
    """
    from optuna_rq.connection import state_dir
    from optuna_rq.protocol import StudySpec
    from optuna_rq.spacefile import load_space_file, merge_param, parse_param, space_to_data
    from optuna_rq.studies import default_storage_url

    options: GlobalOptions = ctx.obj
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
        directions=directions or ["minimize"],
        sampler=sampler,
        seed=seed,
        pruner=pruner,
        storage=storage,
        trial_timeout_s=trial_timeout,
        max_retries=max_retries,
        priority=priority,
        queue=queue,
    )
    client = make_client(options)
    client.submit(spec, storage=storage or default_storage_url(state_dir()))
    typer.echo(spec.name)
    if client.broker_holder() is None:
        _err.print(
            f"[yellow]no broker is running on prefix {options.prefix!r} yet:[/] the study waits "
            "until you start one with `optuna-rq broker`"
        )
    if wait:
        raise typer.Exit(client.follow(spec.name, timeout_s=None))


@app.command()
def status(
    ctx: typer.Context,
    name: Annotated[str | None, typer.Argument(help="A study; default: all of them.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show studies: state, trials by outcome, failures by reason, the best trial."""
    from optuna_rq.progress import status_table

    options: GlobalOptions = ctx.obj
    client = make_client(options)
    snapshots = [client.require_status(name)] if name is not None else client.statuses()
    if as_json:
        shown = [s.to_dict() for s in snapshots]
        typer.echo(json.dumps(shown[0] if name is not None else shown, indent=2))
        return
    if not snapshots:
        _out.print(f"no studies on prefix {options.prefix!r}")
    for snapshot in snapshots:
        _out.print(status_table(snapshot))


@app.command("wait")
def wait_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The study to follow.")],
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Give up after this many seconds.")
    ] = None,
) -> None:
    """Follow a study with a progress bar until it ends.

    Exit 0 when it finished; 1 when it was cancelled, failed, or the timeout passed.
    """
    options: GlobalOptions = ctx.obj
    raise typer.Exit(make_client(options).follow(name, timeout_s=timeout))


@app.command()
def cancel(
    ctx: typer.Context, name: Annotated[str, typer.Argument(help="The study to cancel.")]
) -> None:
    """Cancel a study: no new trials; queued and running ones end FAIL (cancelled)."""
    client = make_client(ctx.obj)
    client.require_status(name)
    client.cancel(name)
    _err.print(f"cancelling study {name!r}")


@app.command("set")
def set_command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The study to change.")],
    concurrency: Annotated[int | None, typer.Option("--concurrency", min=1)] = None,
    n_trials: Annotated[int | None, typer.Option("--n-trials", min=1)] = None,
    priority: Annotated[float | None, typer.Option("--priority", min=0.001)] = None,
) -> None:
    """Change a running study's cap, budget or priority."""
    changes = {
        k: v
        for k, v in {"concurrency": concurrency, "n_trials": n_trials, "priority": priority}.items()
        if v is not None
    }
    if not changes:
        raise ConfigError("nothing to change: give --concurrency, --n-trials or --priority")
    client = make_client(ctx.obj)
    client.require_status(name)
    client.change(name, **changes)
    _err.print(f"study {name!r}: {changes}")


@app.command()
def demo(
    n_trials: Annotated[int, typer.Option("--n-trials", min=1)] = 60,
    workers: Annotated[int, typer.Option("--workers", min=1)] = 2,
) -> None:
    """Run the bundled example study on a private embedded Redis, a broker and two workers.

    Shows the progress, prints the best trial, and leaves nothing running.
    """
    from optuna_rq.demo import run_demo

    run_demo(n_trials=n_trials, workers=workers)


def main() -> None:
    """Console entry point: run the app, turning our errors into one-line messages."""
    debug = "--debug" in sys.argv
    try:
        # Not standalone: click then returns a typer.Exit's code instead of exiting itself.
        code = app(standalone_mode=False)
        sys.exit(code if isinstance(code, int) else 0)
    except OptunaRQError as exc:
        _fail(exc, code=exc.exit_code, debug=debug)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as exc:  # click's own usage errors
        import click

        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        raise


def _fail(exc: BaseException, *, code: int, debug: bool) -> None:
    if debug:
        import traceback

        traceback.print_exception(exc)
    typer.echo(f"Error: {exc}", err=True)
    sys.exit(code)


if __name__ == "__main__":
    main()
