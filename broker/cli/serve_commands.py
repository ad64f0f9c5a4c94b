"""The commands that serve: `optuna-rq workers` (a pool of worker processes) and `optuna-rq
broker` (the daemon). Both run in the foreground until a signal stops them."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from optuna_rq.cli.options import GlobalOptions, LogLevel, configure_logging, connect_redis
from optuna_rq.daemon.broker_health import DEFAULT_STALL_LIMIT_S, BrokerHealth, serve_http
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import DEFAULT_LEASE_TTL_S, DEFAULT_QUEUE, Role
from optuna_rq.sampling import OFF_LOOP_AT_S, SAMPLES_TO_DECIDE
from optuna_rq.workers.isolation import Isolation
from optuna_rq.workers.pool_health import DEFAULT_POOL_STALL_LIMIT_S, PoolLiveness

if TYPE_CHECKING:
    from optuna_rq.workers.pool_settings import WorkerSettings

__all__ = ["broker", "workers"]

LogLevelOption = Annotated[
    LogLevel,
    typer.Option("--log-level", case_sensitive=False, help="Log from this level up (any case)."),
]
"""The --log-level of the two long-running roles (Optuna's own lines follow it too)."""


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
            "memory a trial leaked is given back.",
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


def broker(
    ctx: typer.Context,
    storage: Annotated[
        str | None,
        typer.Option(
            "--storage",
            metavar="URL",
            help="Default Optuna storage for studies that name none: sqlite:///..., "
            "postgresql://..., journal:///path, or memory. "
            "Default: a journal file under the state directory.",
            show_default=False,
        ),
    ] = None,
    allow_storage: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-storage",
            metavar="PATTERN",
            help="Another storage a study may name (submit --storage), besides the default; "
            "repeatable. A URL pattern ('postgresql://db.internal/*', 'sqlite:////data/*.db') "
            "or a path pattern of journal files ('/data/studies/*.journal'): '*' matches "
            "within one path segment, '**' anything; paths are resolved before they are "
            "matched, and user names and passwords are not matched. Optuna's JournalRedis "
            "(redis://, rediss://) unpickles what it loads: only a pattern that starts with "
            "'redis://' or 'rediss://' allows it. Any other storage is refused.",
        ),
    ] = None,
    log_level: LogLevelOption = LogLevel.INFO,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            min=1,
            max=65535,
            metavar="PORT",
            help="Serve Prometheus metrics (/metrics) and health probes on this port: /healthz "
            "(the dispatch loop turns) and /readyz (it holds the lock and its Redis answers).",
        ),
    ] = None,
    stall_limit: Annotated[
        float,
        typer.Option(
            "--stall-limit",
            min=0.1,
            metavar="SECONDS",
            help="Seconds one turn of the dispatch loop may take before /healthz reports the "
            "broker stuck (503) and an orchestrator restarts it.",
        ),
    ] = DEFAULT_STALL_LIMIT_S,
    sample_off_loop: Annotated[
        bool,
        typer.Option(
            "--sample-off-loop/--sample-on-loop",
            help="Let studies whose sampler is slow sample in a process of the broker's own, so "
            "that results, leases and trials' calls are served meanwhile (studies on a journal "
            "file, the default storage, whose space is sampled at the ask: --param or --space). "
            "--sample-on-loop samples every study in the dispatch loop.",
        ),
    ] = True,
    off_loop_above: Annotated[
        float,
        typer.Option(
            "--off-loop-above",
            min=0.0,
            metavar="MS",
            help="How slow is slow: CPU milliseconds per trial of sampling on the loop, "
            f"the median of a study's last {SAMPLES_TO_DECIDE} (TPE passes 2 once past its "
            "startup trials, GP and CMA-ES too; RandomSampler costs about 1).",
        ),
    ] = OFF_LOOP_AT_S * 1000,
    lock_ttl: Annotated[
        float | None,
        typer.Option(
            "--lock-ttl",
            min=0.5,
            metavar="SECONDS",
            help="Seconds the broker lock outlives its last renewal (renewed every third of "
            "it): a broker frozen or cut off from Redis longer than this loses the prefix to a "
            "standby, and writes nothing more.  [default: 10]",
            show_default=False,
        ),
    ] = None,
    standby: Annotated[
        bool,
        typer.Option(
            "--standby",
            help="If another broker serves the prefix, stand by instead of exiting: take over "
            "within --lock-ttl when it dies or freezes, and resume every study. It must reach "
            "the same Redis (--redis-url) and the same study storages (--storage: PostgreSQL, "
            "or a journal file path both brokers reach). Without it, a second broker exits.",
        ),
    ] = False,
) -> None:
    """Run the broker daemon in the foreground: it serves every study submitted on this prefix.

    One broker per prefix: a second one exits, unless started with --standby, when it waits
    and takes over if the first one dies or freezes. SIGTERM or Ctrl-C stops it gracefully
    (a standby too); running trials go on, and a restarted broker tells their results.
    """
    from optuna_rq.daemon import BrokerSettings, Daemon
    from optuna_rq.daemon.ledger import ledger_file
    from optuna_rq.dispatch import OffLoopSampling
    from optuna_rq.protocol import Keys
    from optuna_rq.sampling.sampler_process import SamplerProcess
    from optuna_rq.storage.storage_access import default_storage_url, open_storage
    from optuna_rq.storage.storage_policy import StoragePolicy

    options: GlobalOptions = ctx.obj
    configure_logging(log_level)
    if standby and not options.redis_url:
        raise ConfigError(
            "--standby needs the Redis the active broker uses: give it with --redis-url "
            "(OPTUNA_RQ_REDIS_URL). Without one a broker starts its own embedded Redis, which "
            "no other broker serves."
        )
    storage_url = storage or default_storage_url(options.state())
    allowed = tuple(allow_storage or [])
    StoragePolicy(storage_url, allowed)  # a pattern it refuses stops us here
    open_storage(storage_url)  # a URL Optuna rejects stops us here, before any study
    settings = BrokerSettings(
        prefix=options.prefix,
        storage=storage_url,
        allowed_storages=allowed,
        command_ledger=ledger_file(options.state(), options.prefix),
        standby=standby,
    )
    if lock_ttl is not None:
        settings = dataclasses.replace(settings, lock_ttl_s=lock_ttl)
    signer = options.signer(Role.BROKER)
    health = BrokerHealth(stall_limit)
    metrics = None
    if metrics_port is not None:  # a port taken is a usage error: found before Redis is met
        from optuna_rq.daemon.broker_metrics import BrokerMetrics

        metrics = BrokerMetrics()
        try:
            serve_http(metrics_port, metrics.registry, health)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {metrics_port}: cannot listen on it ({exc.strerror or exc}); "
                "choose a free port"
            ) from exc
    url, connection = connect_redis(options)
    # Slow samplers sample there (`optuna_rq.dispatch.offloop`); it wakes the loop on Redis.
    sampler_process = (
        SamplerProcess(url, options.password(), Keys(options.prefix).wake)
        if sample_off_loop
        else None
    )
    off_loop = OffLoopSampling(sampler_process, above_s=off_loop_above / 1000)
    daemon = Daemon(connection, settings, signer, metrics, health, off_loop)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger("optuna_rq.broker").info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.run(stop)
