"""One worker process of a pool, from its spawn to its exit: `child_main`.

It leads its own process group, dies with its parent, sets its GPUs before anything imports
CUDA, imports the served modules, installs its `WorkerContext`, and runs an RQ worker of its
isolation mode until it is told to stop, or, with `--max-trials-per-child N`, until it took N
trials: then it reports that to its parent (`Retiring`), and the parent replaces it with a fresh
process.
"""

from __future__ import annotations

import faulthandler
import logging
import multiprocessing.connection
import os
import signal
import sys

import redis

from optuna_rq.plumbing import failpoints
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.plumbing.redis_waits import wait_for_redis
from optuna_rq.workers import context, loader
from optuna_rq.workers.child_messages import ChildChannel
from optuna_rq.workers.gpus import VISIBLE_DEVICES
from optuna_rq.workers.pool_settings import WorkerSettings
from optuna_rq.workers.rq_worker import new_worker
from optuna_rq.workers.supervision import die_with_parent
from optuna_rq.workers.worker_metrics import WorkerMetrics

__all__ = ["DUMP_SIGNAL", "child_main", "put_on_path"]

DUMP_SIGNAL = signal.SIGUSR1
"""Makes a child write every thread's stack to stderr (`faulthandler`): what a stuck one was
doing."""

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


def put_on_path(paths: tuple[str, ...]) -> None:
    """Put `paths` first on sys.path, in order (--path, then the current directory)."""
    for path in reversed(paths):
        if path not in sys.path:
            sys.path.insert(0, path)


def child_main(
    settings: WorkerSettings,
    index: int,
    name: str,
    channel: multiprocessing.connection.Connection,
) -> None:
    """One worker process: its own process group, so a terminal's Ctrl-C reaches only the parent,
    which then stops each child exactly once (a second signal would be RQ's cold shutdown), and
    so a timeout kills whatever the objective started too."""
    os.setpgid(0, 0)
    die_with_parent()
    faulthandler.register(DUMP_SIGNAL, all_threads=True)
    if settings.gpus is not None:  # before anything imports CUDA
        os.environ[VISIBLE_DEVICES] = settings.gpus[index]
    put_on_path(settings.paths)
    logging.basicConfig(level=settings.log_level, format=_LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("rq").setLevel(logging.WARNING)  # a trial's lines are ours to write
    served = loader.serve(settings.modules)
    parent = ChildChannel(channel)
    metrics = (
        None if settings.metrics_port is None else WorkerMetrics(settings.metrics_port + index)
    )
    context.install(
        context.WorkerContext(
            served=served,
            signer=settings.signer(),
            channel=parent,
            lease_ttl_s=settings.lease_ttl_s,
            metrics=metrics,
        )
    )
    connection = connect(settings.redis_url, password=settings.redis_password)
    _wait_for_redis(connection)
    worker = new_worker(settings.isolation, connection, settings.rq_queues, name=name)
    limit = settings.max_trials_per_child
    try:
        worker.work(logging_level="WARNING", max_jobs=limit)
    except UNREACHABLE as exc:  # RQ's own teardown, say, met the outage: one line, not a traceback
        outage_of(connection).failed(exc)
    if outage_of(connection).down:
        outage_of(connection).stopping(
            f"worker {index} leaves its RQ registration to expire on its own"
        )
    if limit is not None and worker.jobs_taken >= limit:
        parent.retiring(worker.jobs_taken)
    failpoints.hit("worker_stopped")  # the fault tests' stuck child: out of RQ, not yet gone


def _wait_for_redis(connection: redis.Redis) -> None:
    """Block until Redis answers, backing off: a worker started during an outage waits for it
    instead of dying and being restarted in a loop."""
    try:
        connection.ping()
    except UNREACHABLE as exc:
        wait_for_redis(connection, exc, max_backoff_s=10.0)
