"""`optuna-rq broker`: the daemon, in the foreground until a signal stops it."""

from __future__ import annotations

import dataclasses
import logging
import signal
import threading
from typing import TYPE_CHECKING, Annotated

import typer

from optuna_rq.cli.options import (
    GlobalOptions,
    LogLevel,
    LogLevelOption,
    configure_logging,
    connect_redis,
)
from optuna_rq.daemon.broker_health import DEFAULT_STALL_LIMIT_S, BrokerHealth, serve_http
from optuna_rq.errors import ConfigError
from optuna_rq.protocol import Role
from optuna_rq.sampling import OFF_LOOP_AT_S, PROCESSES_BY_DEFAULT, SAMPLES_TO_DECIDE

if TYPE_CHECKING:
    pass

__all__ = ["broker"]


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
    sampler_processes: Annotated[
        int,
        typer.Option(
            "--sampler-processes",
            min=1,
            max=64,
            metavar="N",
            help="The most processes slow samplers sample in. The first starts when a study "
            "first samples slowly; one more each time the studies wait on those running (a "
            "study with many workers and a slow sampler), each with its own copy of the "
            "study's sampler, seeing the others' trials as RUNNING. A study at --concurrency 1 "
            "samples in one process, as study.optimize would. Default: the broker's cores, "
            "up to 8.",
            show_default=False,
        ),
    ] = PROCESSES_BY_DEFAULT,
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
    from optuna_rq.sampling.sampler_pool import SamplerPool
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
    # Slow samplers sample there (`optuna_rq.dispatch.offloop`); they wake the loop on Redis.
    pool = (
        SamplerPool(url, options.password(), Keys(options.prefix).wake, most=sampler_processes)
        if sample_off_loop
        else None
    )
    off_loop = OffLoopSampling(pool, above_s=off_loop_above / 1000)
    daemon = Daemon(connection, settings, signer, metrics, health, off_loop)
    stop = threading.Event()

    def on_signal(signum: int, frame: object) -> None:
        logging.getLogger("optuna_rq.broker").info("stopping on %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    daemon.run(stop)
