"""RQ's per-job bookkeeping, with the round trips a trial does not need taken out.

A plain RQ worker makes about 20 Redis round trips per job; on a fast objective they are most
of a trial's cost (benchmarks/profile_worker.py profiles a worker on a no-op trial). Most are
bookkeeping that repeats itself between two jobs:

- `heartbeat()` sends HSET + EXPIRE + EXPIRE as three round trips, and the work loop calls it
  three times per job (after the job, before and after dequeueing). Here it is one pipeline, and
  it is skipped when a heartbeat sent less than `HEARTBEAT_EVERY_S` ago already keeps the worker
  key alive at least as long: so never when a shorter TTL (a job's) was set since, and a worker
  about to block on an empty queue always leaves a full TTL behind it.
- `set_state()` writes the worker's state even when it is already that state (IDLE is written
  after each job and again before dequeueing): a repeat is skipped, and `job_done()` sends the
  IDLE after a job together with the heartbeat.
- `check_for_suspension()` (the work loop's check for `rq suspend`, before every dequeue) sends
  a heartbeat and an EXISTS in a MULTI/EXEC: here the EXISTS alone, and the heartbeat by the rule
  above, so never right after a job, whose `job_done()` sent one.
- `handle_execution_ended()` writes the job's `last_heartbeat` right before the job is marked
  finished: it only guards RQ's success and failure callbacks, which trial jobs do not have.

(The broker keeps a finished trial's job for a few seconds rather than having it deleted at
once: RQ's delete reads the job's status and executions first, seven more round trips.)

What RQ and its tools see is unchanged: job statuses, registries, the intermediate list, worker
registration, `rq info`.

A full Redis (at `maxmemory`, with `noeviction`) refuses RQ's writes with OutOfMemoryError, which
RQ's work loop takes for a reason to quit. Here the writes a worker needs to take a trial's job,
start it and end it (its registration, the dequeue, its execution record, its start, its success)
wait until Redis has room and are sent again: each is one MULTI/EXEC or one command, refused
whole, so sending it again is safe. The heartbeat, the state, the registry sweep and the
unregistration of a worker leaving are skipped instead: the next ones (or a TTL) make up for
them.

A Redis that cannot be reached is ridden out the same way, in place of RQ's own retry loop (which
logs an ERROR at every retry and waits without jitter) and its work loop (which quits on a
timeout, with a traceback): the dequeue (`RidingQueue`), the suspension check and the writes
above wait for Redis with the shared jittered backoff (`redis_waits.wait_for_redis`), the skipped
ones are only counted, and all of it is logged through the process's `Outage`: one line when
Redis goes away, one when it is back. A worker told to stop while it waits stops
(`StopRequested`), and leaves its registration to expire.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from rq.exceptions import StopRequested
from rq.job import Job
from rq.queue import Queue
from rq.suspension import WORKERS_SUSPENDED
from rq.utils import now
from rq.worker import WorkerStatus

from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.plumbing.redis_waits import is_full, wait_for_memory, wait_for_redis
from optuna_rq.workers import context

__all__ = ["HEARTBEAT_EVERY_S", "LeanBookkeeping", "RidingQueue"]

HEARTBEAT_EVERY_S = 1.0

log = logging.getLogger("optuna_rq.pool")

T = TypeVar("T")


class RidingQueue(Queue):
    """RQ's queue, whose dequeue waits out an outage (see the module) instead of raising into
    RQ's retry loop. A stop asked meanwhile ends the wait: RQ's signal handler raises
    StopRequested out of it, as out of RQ's own blocking dequeue."""

    @classmethod
    def dequeue_any(  # type: ignore[override]
        cls, queues: Any, timeout: int | None, connection: redis.Redis, **kwargs: Any
    ) -> Any:
        while True:
            try:
                taken = super().dequeue_any(queues, timeout, connection, **kwargs)
            except UNREACHABLE as exc:
                if wait_for_redis(connection, exc, stop=context.current().stopping) is None:
                    raise StopRequested() from None
                continue
            outage_of(connection).recovered()
            return taken


class LeanBookkeeping:
    """Mixed into an RQ worker class, before it: `class W(LeanBookkeeping, SimpleWorker)`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Set once RQ checked the queues it was given are of its `queue_class` (plain RQ queues,
        # `protocol.trial_queue`'s): the dequeue is ours from here on.
        self.queue_class = RidingQueue

    _key_expires_at = 0.0  # monotonic time the worker key expires, per the last heartbeat sent

    _full_logged = False  # this process logged that Redis is full, and has not written since

    def heartbeat(self, timeout: int | None = None, pipeline: Any = None) -> None:
        ttl = timeout or self.worker_ttl + 60  # type: ignore[attr-defined]
        expires_at = time.monotonic() + ttl
        if pipeline is not None:  # part of RQ's own pipeline: always sent
            super().heartbeat(timeout, pipeline=pipeline)  # type: ignore[misc]
            self._key_expires_at = expires_at
            return
        if expires_at - self._key_expires_at < HEARTBEAT_EVERY_S:
            return  # a recent heartbeat keeps the key alive as long as this one would
        if self._away():
            return  # its key lives on (RQ's TTL) until Redis is back
        try:
            with self.connection.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
                super().heartbeat(timeout, pipeline=pipe)  # type: ignore[misc]
                pipe.execute()
        except UNREACHABLE as exc:
            self._skipped(exc)
            return
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise
            return  # skipped: its key lives on (RQ's TTL) until the next one
        self._key_expires_at = expires_at

    def set_state(self, state: str, pipeline: Any = None) -> None:
        if pipeline is None:
            if state == self.get_state():  # type: ignore[attr-defined]
                return
            if self._away():
                self._state = state  # what RQ's own set_state keeps before it writes
                return
        try:
            super().set_state(state, pipeline=pipeline)  # type: ignore[misc]
        except UNREACHABLE as exc:
            if pipeline is not None:
                raise  # not sent: the pipeline's owner meets it
            self._skipped(exc)
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise  # skipped when Redis is full: what `rq info` shows, nothing more

    def job_done(self) -> None:
        """After a job: IDLE, and a heartbeat, in one round trip; nothing if the job's end sent
        both (`TrialWorker.cleanup_execution`)."""
        ttl_s = self.worker_ttl + 60  # type: ignore[attr-defined]
        recent = time.monotonic() + ttl_s - self._key_expires_at < HEARTBEAT_EVERY_S
        if recent and self.get_state() == WorkerStatus.IDLE:  # type: ignore[attr-defined]
            return
        if self._away():
            self._state = WorkerStatus.IDLE
            return
        try:
            with self.connection.pipeline(transaction=False) as pipe:  # type: ignore[attr-defined]
                self.set_state(WorkerStatus.IDLE, pipeline=pipe)
                self.heartbeat(pipeline=pipe)
                pipe.execute()
        except UNREACHABLE as exc:
            self._skipped(exc)
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise

    def run_maintenance_tasks(self) -> None:
        if self._away():
            return  # the next sweep does it
        try:
            super().run_maintenance_tasks()  # type: ignore[misc]
        except UNREACHABLE as exc:
            self._skipped(exc)
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise  # a sweep skipped when Redis is full: the next one does it

    def register_death(self) -> None:
        if self._away():
            return  # a worker leaving while Redis is away: its key expires on its own
        try:
            super().register_death()  # type: ignore[misc]
        except UNREACHABLE as exc:
            self._skipped(exc)
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise  # a worker leaving while Redis is full: its key expires on its own

    def set_shutdown_requested_date(self) -> None:
        """RQ writes it from its signal handler, in the middle of a trial: where Redis is away,
        raised there it would end the trial as the objective's exception."""
        if self._away():
            return
        try:
            super().set_shutdown_requested_date()  # type: ignore[misc]
        except UNREACHABLE as exc:
            self._skipped(exc)
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise

    def _away(self) -> bool:
        """Whether this process knows Redis is away (its last try failed): the writes that can
        be skipped are, without a try (and its client's retries) each, until one that waits for
        Redis (a dequeue, a job's start or end) finds it back."""
        return outage_of(self.connection).down  # type: ignore[attr-defined]

    def _skipped(self, error: Exception) -> None:
        """A write skipped because Redis is away: counted in the process's outage."""
        outage_of(self.connection).failed(error)  # type: ignore[attr-defined]

    def request_stop(self, signum: int, frame: Any) -> None:
        """RQ's warm shutdown, which also ends any wait for Redis this process is in (a result
        it cannot deliver, a write it cannot send: given up on, and logged)."""
        context.current().stopping.set()
        super().request_stop(signum, frame)  # type: ignore[misc]

    # The writes a trial's job needs: sent again once Redis has room, or is back.

    def check_for_suspension(self, burst: bool) -> None:
        """RQ's own check, but for its round trip (see the module): while `rq suspend` holds, the
        worker says it is suspended and waits (a burst worker stops), then takes its state back."""
        before, name = None, self.name  # type: ignore[attr-defined]
        while not self._stop_requested and self._suspended():
            if burst:
                log.info("worker %s: suspended in burst mode, stopping", name)
                raise StopRequested()
            if before is None:
                log.info("worker %s: suspended, run `rq resume` to resume", name)
                before = self.get_state()  # type: ignore[attr-defined]
                self.set_state(WorkerStatus.SUSPENDED)
            context.current().stopping.wait(1.0)
        if before is not None:
            self.set_state(before)

    def _suspended(self) -> bool:
        """Whether `rq suspend` holds; the heartbeat with it only when one is due."""
        self.heartbeat()
        exists = self.connection.exists  # type: ignore[attr-defined]
        return bool(self._when_room("check for `rq suspend`", lambda: exists(WORKERS_SUSPENDED)))

    def register_birth(self, *args: Any, **kwargs: Any) -> None:
        method = super().register_birth  # type: ignore[misc]
        self._when_room("register", lambda: method(*args, **kwargs))

    def dequeue_job_and_maintain_ttl(self, *args: Any, **kwargs: Any) -> Any:
        method = super().dequeue_job_and_maintain_ttl  # type: ignore[misc]
        return self._when_room("take the next trial", lambda: method(*args, **kwargs))

    def prepare_execution(self, job: Job, *args: Any, **kwargs: Any) -> Any:
        method = super().prepare_execution  # type: ignore[misc]
        return self._when_room(f"start job {job.id}", lambda: method(job, *args, **kwargs))

    def prepare_job_execution(self, job: Job, *args: Any, **kwargs: Any) -> None:
        method = super().prepare_job_execution  # type: ignore[misc]
        self._when_room(f"start job {job.id}", lambda: method(job, *args, **kwargs))

    def handle_job_success(self, job: Job, *args: Any, **kwargs: Any) -> None:
        method = super().handle_job_success  # type: ignore[misc]
        try:
            self._when_room(f"record job {job.id} finished", lambda: method(job, *args, **kwargs))
        except StopRequested:
            # Told to stop while Redis is away, after the trial (its result delivered or logged
            # undelivered): RQ's record of the job is left to RQ's registry cleanup. Raised
            # here, RQ would take it for the job's failure and log it with a traceback.
            self._stop_requested = True

    def _when_room(self, what: str, write: Callable[[], T]) -> T:
        """`write()`, sent again each time a full Redis refused it, once Redis has room, or each
        time Redis could not be reached, once it is back; Redis being full is logged once until
        this process writes again, an outage once by the process's `Outage`. Raises
        StopRequested if the worker is told to stop while Redis is away."""
        connection = self.connection  # type: ignore[attr-defined]
        stopping = context.current().stopping
        while True:
            if stopping.is_set() and self._away():
                raise StopRequested()  # told to stop: nothing more is sent to a Redis away
            try:
                done = write()
            except UNREACHABLE as exc:
                if wait_for_redis(connection, exc, stop=stopping) is None:
                    raise StopRequested() from None
                continue
            except redis.ResponseError as exc:
                if not is_full(exc):
                    raise
                wait_for_memory(
                    self.connection,  # type: ignore[attr-defined]
                    exc,
                    what=f"worker {self.name} waits to {what}",  # type: ignore[attr-defined]
                    quiet=self._full_logged,
                )
                self._full_logged = True
                continue
            self._full_logged = False
            outage_of(connection).recovered()
            return done

    def handle_execution_ended(self, job: Job, queue: Queue, heartbeat_ttl: int) -> None:
        job.ended_at = now()
