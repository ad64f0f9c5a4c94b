"""A pool's child processes as its parent keeps them: the record of each (`Child`), how the parent
signals one, and how a dead one's RQ registration is dropped.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
from dataclasses import dataclass

import redis
from rq import Worker

from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.protocol import MsgpackSerializer

__all__ = ["Child", "forget_rq_worker", "signal_group"]

log = logging.getLogger("optuna_rq.pool")


@dataclass
class Child:
    process: multiprocessing.process.BaseProcess
    channel: multiprocessing.connection.Connection  # the parent's reading end
    name: str
    started: float
    told_to_stop: float | None = None  # time.monotonic() of the SIGTERM that stops it
    dumped_at: float | None = None  # stuck: when it was asked for its stacks
    retired_after: int | None = None  # trials: it took its --max-trials-per-child, and exits


def signal_group(
    process: multiprocessing.process.BaseProcess, signum: int, *, group: bool = True
) -> None:
    """Signal a child (and, with `group`, everything in its process group)."""
    if process.pid is None or not process.is_alive():
        return
    try:
        if group:
            os.killpg(process.pid, signum)
        else:
            os.kill(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def forget_rq_worker(connection: redis.Redis, name: str) -> None:
    """Remove a dead child's RQ registration, so worker counts (and fair shares) see it gone
    now rather than when its heartbeat key expires. Not while Redis is away: its key expires."""
    if outage_of(connection).down:
        return
    try:
        worker = Worker.find_by_key(
            Worker.redis_worker_namespace_prefix + name,
            connection=connection,
            serializer=MsgpackSerializer,
        )
        if worker is not None:
            worker.register_death()  # type: ignore[no-untyped-call]
    except UNREACHABLE as exc:
        outage_of(connection).failed(exc)
    except redis.RedisError as exc:
        log.debug("could not unregister RQ worker %s: %s", name, exc)
