"""`optuna-rq workers`: a pool of worker processes, in the foreground until a signal stops it."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from optuna_rq.cli.options import (
    GlobalOptions,
    LogLevel,
    LogLevelOption,
    configure_logging,
    connect_redis,
)
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import DEFAULT_LEASE_TTL_S, DEFAULT_QUEUE, Role
from optuna_rq.workers.isolation import Isolation
from optuna_rq.workers.pool_health import DEFAULT_POOL_STALL_LIMIT_S, PoolLiveness

if TYPE_CHECKING:
    from optuna_rq.workers.pool_settings import WorkerSettings

__all__ = ["workers"]


def workers(
    ctx: typer.Context,
    modules: Annotated[
        list[str],
        typer.Option(
            "--import",
            "-i",
            metavar="MODULE",
            help="A module whose objectives these workers run (repeat for several). "
            "Only objectives defined in these modules are ever imported.",
        ),
    ],
    count: Annotated[
        int | None,
        typer.Option(
            "--count",
            "-n",
            min=1,
            metavar="N",
            help="Worker processes. Default: 1, or one per --gpus set.",
        ),
    ] = None,
    queues: Annotated[
        list[str] | None,
        typer.Option(
            "--queue",
            "-q",
            metavar="NAME",
            help="A resource class to take trials of (studies submitted with --queue NAME); "
            "repeat for several, first served first. Default: default.",
        ),
    ] = None,
    paths: Annotated[
        list[Path] | None,
        typer.Option(
            "--path",
            "-P",
            metavar="DIR",
            help="A directory to import the --import modules from (repeatable). "
            "The current directory always is one.",
        ),
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            "--gpus",
            metavar="GPUS",
            help="GPUs to pin worker processes to, out of the pool's own: those of "
            "CUDA_VISIBLE_DEVICES when it is set, else the machine's (nvidia-smi). A count "
            "takes the first N (--gpus 2), all takes every one, device= names them by index "
            "or UUID (--gpus device=2,3); a device outside them is refused. Each worker "
            "process gets its own CUDA_VISIBLE_DEVICES, kept across restarts.",
        ),
    ] = None,
    gpus_per_trial: Annotated[
        int, typer.Option("--gpus-per-trial", min=1, help="GPUs each worker process gets.")
    ] = 1,
    max_trials_per_child: Annotated[
        int | None,
        typer.Option(
            "--max-trials-per-child",
            min=1,
            metavar="N",
            help="Replace a worker process by a fresh one after N trials (Celery's "
            "--max-tasks-per-child): the new one imports the objectives again, so an edit to "
            "an objective reaches every process within N of its trials, without a restart, and "
            "memory a trial leaked is given back. It counts RQ jobs: a study's batch "
            "(submit --batch) is one.",
        ),
    ] = None,
    autoscale: Annotated[
        str | None,
        typer.Option(
            "--autoscale",
            metavar="MAX,MIN",
            help="Grow to MAX worker processes while studies on these queues want them, "
            "shrink to MIN when idle (only idle workers are stopped). Celery's spelling, MAX,MIN, "
            "or MIN,MAX: the smaller number is the minimum. One number N means N,1.",
        ),
    ] = None,
    scale_down_after: Annotated[
        float,
        typer.Option(
            "--scale-down-after",
            min=0,
            metavar="SECONDS",
            help="With --autoscale: seconds a worker process stays idle before it is retired.",
        ),
    ] = 30.0,
    log_level: LogLevelOption = LogLevel.INFO,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics: worker i listens on PORT + i.",
        ),
    ] = None,
    health_port: Annotated[
        int | None,
        typer.Option(
            "--health-port",
            min=1,
            max=65535,
            metavar="PORT",
            help="Serve /healthz on this port from the pool's own process, for a liveness "
            "probe: 200 while its supervising loop (leases, heartbeat) turns, 503 once it has "
            "not for --stall-limit seconds. Apart from the workers' --metrics-port range.",
        ),
    ] = None,
    stall_limit: Annotated[
        float,
        typer.Option(
            "--stall-limit",
            min=0.1,
            metavar="SECONDS",
            help="With --health-port: seconds the pool's loop may go without a turn before "
            "/healthz reports the pool stuck (503).",
        ),
    ] = DEFAULT_POOL_STALL_LIMIT_S,
    lease_ttl: Annotated[
        float,
        typer.Option(
            "--lease-ttl",
            envvar="OPTUNA_RQ_LEASE_TTL",
            min=0.5,
            metavar="SECONDS",
            help="Seconds a running trial's lease outlives the worker that stops renewing it: "
            "how soon the broker notices a killed or frozen worker and retries its trial.",
        ),
    ] = DEFAULT_LEASE_TTL_S,
    isolation: Annotated[
        Isolation,
        typer.Option(
            "--isolation",
            help="process: each worker process runs trials one after another (fastest). "
            "fork: a fresh fork per trial, as plain RQ does (nothing leaks between trials).",
        ),
    ] = Isolation.PROCESS,
) -> None:
    """Start COUNT worker processes that run trials of objectives from the --import modules.

    They take only trials of those modules, from the --queue resource classes, first served
    first: `--queue gpu --queue default` takes GPU trials before default ones.

    SIGTERM or Ctrl-C stops them gracefully: each finishes its running trial first. A second
    one stops them at once; the broker retries their trials elsewhere.

    A worker process imports the objectives once, when it starts: to run an edited objective,
    restart the workers, or start them with --max-trials-per-child N to have each process
    replaced by a fresh one after N trials.
    """
    from optuna_rq.workers.autoscale import parse_autoscale
    from optuna_rq.workers.gpus import allocation, device_sets
    from optuna_rq.workers.pool import WorkerPool
    from optuna_rq.workers.pool_settings import WorkerSettings

    options: GlobalOptions = ctx.obj
    signer = options.signer(Role.WORKER)
    level = configure_logging(log_level)
    devices = None if gpus is None else device_sets(gpus, allocation(os.environ), gpus_per_trial)
    if gpus is None and gpus_per_trial != 1:
        raise ConfigError("--gpus-per-trial needs --gpus (the devices to share out)")
    if autoscale is not None and count is not None:
        raise ConfigError("give --count or --autoscale MAX,MIN, not both")
    for path in paths or []:
        if not path.is_dir():
            raise ConfigError(f"--path {str(path)!r} is not a directory")
    # Every setting is checked before Redis is met (an embedded server started for nothing).
    settings = WorkerSettings(
        redis_url=options.redis_url or "",  # the Redis met below
        redis_password=options.password(),  # to the children through spawn, not argv or env
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
        key=signer.key_token,
        max_message_bytes=signer.max_message_bytes,
        metrics_port=metrics_port,
        lease_ttl_s=lease_ttl,
        isolation=isolation,
        max_trials_per_child=max_trials_per_child,
    )
    liveness = PoolLiveness(stall_limit)
    if health_port is not None:  # a port taken is a usage error: found before Redis is met
        _serve_pool_health(health_port, liveness, settings)
    url, _connection = connect_redis(options)
    settings = dataclasses.replace(settings, redis_url=url)
    raise typer.Exit(WorkerPool(settings, liveness).run())


def _serve_pool_health(port: int, liveness: PoolLiveness, settings: WorkerSettings) -> None:
    """Serve the pool's /healthz on `port`, refusing a port of its workers' metrics."""
    from optuna_rq.workers.pool_health import serve_liveness

    first = settings.metrics_port
    if first is not None and first <= port < first + settings.max_workers:
        raise ConfigError(
            f"--health-port {port}: worker {port - first} serves its metrics there "
            f"(--metrics-port {first} + its index); choose a port outside "
            f"{first}-{first + settings.max_workers - 1}"
        )
    try:
        serve_liveness(port, liveness)
    except OSError as exc:
        raise ConfigError(
            f"--health-port {port}: cannot listen on it ({exc.strerror or exc}); choose a free port"
        ) from exc
