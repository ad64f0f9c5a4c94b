"""The RQ worker classes a pool's children run: RQ's own, refusing every job but our trials.

Two isolation modes (`--isolation`, `ISOLATION`):

- `process` (default): `TrialWorker`, an RQ `SimpleWorker`, runs trials one after another in
  the worker process itself: no fork per trial, the fastest; an objective that kills its process
  costs a restart of that worker process.
- `fork`: `ForkingTrialWorker`, an RQ `Worker`, forks a fresh work horse per trial, as plain RQ
  does: no state leaks from one trial to the next (memory, globals, GPU contexts), at the cost of
  a fork per trial.

A job whose function is not `optuna_rq.protocol.RUN_TRIAL`, or whose data does not decode, is
failed without being run, and without its data being unpickled.

Neither subscribes to RQ's command channel (`rq:pubsub:<worker>`: RQ's shutdown, kill-horse and
stop-job commands). A worker of ours takes its orders from elsewhere: its pool's signals stop it
(`workers.pool`), the broker's cancel marks stop a trial (`workers.supervision`), and the Redis
ACL users of deploy/ let nobody publish there. RQ's subscriber is a thread that blocks up to 60 s
in a read, and RQ's teardown unsubscribes before it stops that thread: a thread that reads the
unsubscribe reply before it is stopped goes on to wait 60 s for a subscription, and the
teardown's join waits for it (as long as its timeout allows): a subscribing worker could hang
in its teardown, for a channel it never uses. Its registration (`rq info`, RQ's worker
registry) is RQ's own.
"""

from __future__ import annotations

import logging
import os
import signal
from types import FrameType
from typing import Any

import redis
from rq import Queue, SimpleWorker, Worker
from rq.executions import Execution
from rq.job import Job
from rq.worker import WorkerStatus

from optuna_rq.protocol import RUN_TRIAL, MsgpackSerializer, trial_queue
from optuna_rq.protocol.spec_bounds import MAX_TRIAL_TIMEOUT_S
from optuna_rq.workers import context
from optuna_rq.workers.bookkeeping import LeanBookkeeping
from optuna_rq.workers.execute import WorkerShutdown
from optuna_rq.workers.isolation import Isolation
from optuna_rq.workers.runner import refuse_trial
from optuna_rq.workers.supervision import die_with_parent

__all__ = [
    "ISOLATION",
    "MAINTENANCE_INTERVAL_S",
    "STOPPING_SIGNAL",
    "ForkingTrialWorker",
    "Isolation",
    "TrialWorker",
    "new_worker",
]

log = logging.getLogger("optuna_rq.pool")


class _PoolMember:
    """What both worker classes share: no command channel (see the module's docstring), and a
    count of the jobs taken, which `--max-trials-per-child` reads."""

    jobs_taken = 0  # jobs this worker took (run or refused), as RQ's max_jobs counts them

    def subscribe(self) -> None:
        """RQ's command channel is not subscribed: nothing to unsubscribe at the teardown."""

    def _took_job(self) -> None:
        self.jobs_taken += 1


def _refused(worker: SimpleWorker | Worker, job: Job, queue: Queue) -> bool:
    """Fail `job` unless it is one of our trials; True if it was refused."""
    try:
        func_name = job.func_name
    except Exception as exc:  # data that is not msgpack: never unpickled, never run
        why = f"job data does not decode: {type(exc).__name__}: {exc}"
    else:
        if func_name != RUN_TRIAL:
            why = f"refused job function {func_name!r}: only trials run here"
        elif (timeout := job.timeout) is not None and not -1 <= timeout <= MAX_TRIAL_TIMEOUT_S:
            # RQ would arm signal.alarm and EXPIRE keys with it: beyond a C int or Redis's range
            # that crashes the worker process, every time the job is taken.
            why = (
                f"its timeout {timeout!r} s is out of range (at most {MAX_TRIAL_TIMEOUT_S} s, "
                "--trial-timeout's limit)"
            )
            refuse_trial(job, why)
        else:
            return False
    log.error("job %s %s", job.id, why)
    worker.handle_job_failure(job, queue, exc_string=why)
    return True


class ShutdownMarked:
    """Mixed into an RQ worker class, before it: its cold shutdown (RQ's second SIGTERM or
    SIGINT) raises `WorkerShutdown`, not a bare `SystemExit`, so where it lands inside an
    objective it is told apart from a `SystemExit` the objective raised (`workers.execute`)."""

    def request_force_stop(self, signum: int, frame: FrameType | None) -> None:
        try:
            super().request_force_stop(signum, frame)  # type: ignore[misc]
        except WorkerShutdown:
            raise
        except SystemExit as exc:
            raise WorkerShutdown(exc.code) from None


class TrialWorker(_PoolMember, ShutdownMarked, LeanBookkeeping, SimpleWorker):
    """An RQ worker that runs our trial job function, and nothing else, in its own process."""

    _started: str | None = None  # the job whose start `prepare_execution` sent whole

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._took_job()
        if _refused(self, job, queue):
            return
        # SimpleWorker.execute_job, with the IDLE that follows a job sent with its heartbeat.
        execution = self.prepare_execution(job)
        self.perform_job(job, queue, execution)
        self.job_done()

    def prepare_execution(self, job: Job) -> Execution:
        """RQ's two transactions that start a job, as one: its execution record and the worker's
        BUSY (`prepare_execution`), then, at the top of `perform_job` in this same process, the
        heartbeats with the job's TTL, the job's start and its removal from the intermediate
        list (`prepare_job_execution`). The job's own heartbeat is left out: its start writes
        the same `last_heartbeat`. Sent again whole if Redis refused it (`LeanBookkeeping`)."""
        return self._when_room(f"start job {job.id}", lambda: self._start(job))

    def _start(self, job: Job) -> Execution:
        ttl = self.get_heartbeat_ttl(job)
        with self.connection.pipeline() as pipe:
            execution = Execution.create(job, ttl, pipeline=pipe, worker_name=self.name)
            self.executions[execution.id] = execution
            self.set_state(WorkerStatus.BUSY, pipeline=pipe)
            self.heartbeat(ttl, pipeline=pipe)
            job.prepare_for_execution(self.name, pipeline=pipe)
            pipe.persist(job.key)
            if len(self.queues) == 1:  # as `perform_job` asks of `prepare_job_execution`
                origin = Queue(job.origin, connection=self.connection)
                pipe.lrem(origin.intermediate_queue_key, 1, job.id)
            pipe.execute()
        self._started = job.id
        return execution

    def cleanup_execution(
        self, job: Job, pipeline: Any, execution: Execution | None = None
    ) -> None:
        """RQ's, with the worker's IDLE and heartbeat: every end of a job (a success, a failure,
        a retry) cleans up its execution in the transaction that records the end, so the worker
        is idle in the same instant, and `job_done` after it has nothing left to send."""
        super().cleanup_execution(job, pipeline, execution)
        self.set_state(WorkerStatus.IDLE, pipeline=pipeline)
        self.heartbeat(pipeline=pipeline)

    def prepare_job_execution(self, job: Job, remove_from_intermediate_queue: bool = False) -> None:
        if self._started == job.id:
            self._started = None
            return  # sent with the execution record
        super().prepare_job_execution(job, remove_from_intermediate_queue)


STOPPING_SIGNAL = signal.SIGUSR2
"""Passed on to a work horse when its worker is told to stop: a result it cannot deliver while
Redis is away is then given up on, and logged (`context.WorkerContext.stopping`)."""


class ForkingTrialWorker(_PoolMember, ShutdownMarked, LeanBookkeeping, Worker):
    """An RQ worker that runs our trial job function, and nothing else, in a fresh fork."""

    _horse: int = 0  # the last work horse's pid, and how it ended (a wait status)
    _horse_status: int | None = None

    def execute_job(self, job: Job, queue: Queue) -> None:
        self._took_job()
        if _refused(self, job, queue):
            return
        self._horse_status = None
        try:
            super().execute_job(job, queue)
        finally:
            channel = context.current().channel
            # It died mid-trial: its supervisor reports the attempt, once it learns how it ended.
            if self._horse_status and channel is not None:
                channel.exited(self._horse, os.waitstatus_to_exitcode(self._horse_status))

    def fork_work_horse(self, job: Job, queue: Queue) -> None:
        super().fork_work_horse(job, queue)
        self._horse = self.horse_pid

    def wait_for_horse(self) -> tuple[int | None, int | None, Any]:
        pid, status, rusage = super().wait_for_horse()
        if pid:
            self._horse_status = status
        return pid, status, rusage

    def setup_work_horse_signals(self) -> None:
        super().setup_work_horse_signals()  # type: ignore[no-untyped-call]
        die_with_parent(check_parent=False)  # the fork does not inherit the death signal
        signal.signal(STOPPING_SIGNAL, lambda signum, frame: context.current().stopping.set())

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        """The warm shutdown reaches the horse too, as `STOPPING_SIGNAL`: it finishes its trial,
        and gives up a result Redis cannot take (the horse's own SIGTERM would kill it)."""
        if self.get_state() == WorkerStatus.BUSY and self.horse_pid:
            try:
                os.kill(self.horse_pid, STOPPING_SIGNAL)
            except ProcessLookupError:
                pass
        super().request_stop(signum, frame)


MAINTENANCE_INTERVAL_S = 60
"""How often RQ sweeps the queue's registries (one worker of all, under RQ's lock). A finished
trial's job stays in RQ's finished registry until a sweep; RQ's default, 10 minutes, would let a
fast study pile up hundreds of thousands of entries."""


ISOLATION: dict[Isolation, type[TrialWorker | ForkingTrialWorker]] = {
    Isolation.PROCESS: TrialWorker,
    Isolation.FORK: ForkingTrialWorker,
}
"""The RQ worker class of each isolation mode."""


def new_worker(
    isolation: str, connection: redis.Redis, queues: list[str], *, name: str
) -> TrialWorker | ForkingTrialWorker:
    """A worker of `ISOLATION[isolation]` on trial queues `queues` (the first served first, as
    `rq worker high low`), speaking msgpack only."""
    return ISOLATION[Isolation(isolation)](
        [trial_queue(connection, queue) for queue in queues],
        connection=connection,
        serializer=MsgpackSerializer,
        name=name,
        maintenance_interval=MAINTENANCE_INTERVAL_S,
    )
