"""`optuna-rq submit`: a study's definition from the command line, checked, then sent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from optuna_rq.cli.options import GlobalOptions, WaitForBroker, make_client
from optuna_rq.cli.output import err_console
from optuna_rq.cli.status_commands import follow_exit
from optuna_rq.cli.study_commands import load_enqueue_file
from optuna_rq.protocol import DEFAULT_QUEUE, Direction, Pruner, Sampler

__all__ = ["submit"]


def _default_study_name(objective: str) -> str:
    function = objective.partition(":")[2] or "study"
    return f"{function}-{time.strftime('%Y%m%d-%H%M%S')}"


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
    batch: Annotated[
        int,
        typer.Option(
            "--batch",
            min=1,
            metavar="N",
            help="Trials sent to a worker in one RQ job, at most: each still runs, is leased "
            "and reports on its own, one after another. For objectives of a few milliseconds, "
            "where RQ's cost per job is most of a trial's. Each worker then keeps N trials "
            "outstanding: give --concurrency N times the workers. Not with --trial-timeout "
            "(RQ times a job, not each trial in it).",
        ),
    ] = 1,
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
        batch=batch,
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
            follow_exit(
                client, spec.name, timeout_s=None, submitted=spec, wait_for_broker=wait_for_broker
            )
        )
