"""RQ's per-job bookkeeping, with the round trips a trial does not need taken out.

A plain RQ worker makes about 20 Redis round trips per job; on a fast objective they are most
of a trial's cost (benchmarks/profile_worker.py: redis-py and its sockets are 85% of a worker's
time on a no-op trial). Most are bookkeeping that repeats itself between two jobs:

- `heartbeat()` sends HSET + EXPIRE + EXPIRE as three round trips, and the work loop calls it
  three times per job (after the job, before and after dequeueing). Here it is one pipeline, and
  it is skipped when a heartbeat sent less than `HEARTBEAT_EVERY_S` ago already keeps the worker
  key alive at least as long: so never when a shorter TTL (a job's) was set since, and a worker
  about to block on an empty queue always leaves a full TTL behind it.
- `set_state()` writes the worker's state even when it is already that state (IDLE is written
  after each job and again before dequeueing): a repeat is skipped, and `job_done()` sends the
  IDLE after a job together with the heartbeat.
- `handle_execution_ended()` writes the job's `last_heartbeat` right before the job is marked
  finished: it only guards RQ's success and failure callbacks, which trial jobs do not have.

(The broker keeps a finished trial's job for a few seconds rather than having it deleted at
once: RQ's delete reads the job's status and executions first, seven more round trips.)

What RQ and its tools see is unchanged: job statuses, registries, the intermediate list, worker
registration, `rq info`.
"""

from __future__ import annotations

import time
from typing import Any

from rq.job import Job
from rq.queue import Queue
from rq.utils import now
from rq.worker import WorkerStatus

__all__ = ["HEARTBEAT_EVERY_S", "LeanBookkeeping"]

HEARTBEAT_EVERY_S = 1.0


class LeanBookkeeping:
    """Mixed into an RQ worker class, before it: `class W(LeanBookkeeping, SimpleWorker)`."""

    _key_expires_at = 0.0  # monotonic time the worker key expires, per the last heartbeat sent

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        ttl = timeout or self.worker_ttl + 60  # type: ignore[attr-defined]
        expires_at = time.monotonic() + ttl
        if pipeline is not None:  # part of RQ's own pipeline: always sent
            super().heartbeat(timeout, pipeline=pipeline)  # type: ignore[misc]
            self._key_expires_at = expires_at
            return
        if expires_at - self._key_expires_at < HEARTBEAT_EVERY_S:
            return  # a recent heartbeat keeps the key alive as long as this one would
        with self.connection.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
            super().heartbeat(timeout, pipeline=pipe)  # type: ignore[misc]
            pipe.execute()
        self._key_expires_at = expires_at

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is None and state == self.get_state():  # type: ignore[attr-defined]
            return
        super().set_state(state, pipeline=pipeline)  # type: ignore[misc]

    def job_done(self) -> None:
        """After a job: IDLE, and a heartbeat, in one round trip."""
        with self.connection.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
            self.set_state(WorkerStatus.IDLE, pipeline=pipe)
            self.heartbeat(pipeline=pipe)
            pipe.execute()

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        job.ended_at = now()
