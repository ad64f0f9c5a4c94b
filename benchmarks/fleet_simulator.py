"""A fleet of simulated workers: many in a few processes, speaking the real protocol.

Each process is one worker pool of `workers` simulated workers on one trial queue. It does, per
trial, what a real worker and its pool do to Redis, through the same functions where they exist:

- dequeue the real RQ job as RQ's `Queue.dequeue_any` does (LMOVE onto the queue's intermediate
  list, then the job's hash: `Job.fetch_many`), blocking in `dequeue_any` itself when the queue
  is empty; refuse any job function but `RUN_TRIAL`, open the signed payload
  (`Signer.open`) and decode the msgpack `TrialRequest`;
- take the attempt's lease and look for its cancel mark in one pipeline, as `runner._leased`
  does, with RQ's own start bookkeeping for a worker on one queue (`Job.prepare_for_execution`,
  PERSIST, LREM from the intermediate list): what the broker's lease watch reads;
- check the objective against the allow-list (`loader.load_objective`: served modules only);
- renew the running leases (SET with a TTL, and EXISTS on the cancel mark) every quarter of the
  lease TTL in one pipeline, as the pool's `Supervisor` does; a cancelled attempt ends FAIL
  `cancelled`;
- keep the pool's signed heartbeat (`workers.heartbeat.Heartbeat`), so the broker's fair share
  counts the simulated workers live;
- "run" the trial by waiting its simulated duration (a timer: many trials in flight per process),
  then build the `TrialResult` (`execute.trial_result`) and append it, sealed, to the result
  stream under `RESULT_FIELD`, dropping the lease (what `delivery.deliver` writes); then RQ's
  end bookkeeping: status finished, the job's hash expiring after its `result_ttl`.

What differs from a real worker: no process per worker and no fork (one loop serves them all);
the jobs taken, the leases taken and the results delivered in one turn go in one round trip of
each kind, where real workers would each send their own (the same writes, in the same order per
trial: fewer round trips leave more of this machine's two cores to the broker under test);
the objective is never called (its value is the wall-clock second the simulated run started, so
the benchmark reads dispatch latency off the study), no RQ worker registration, heartbeat or
statistics (the broker counts pools, not RQ workers), and no StartedJobRegistry or
FinishedJobRegistry entries (nothing of ours reads them; RQ's maintenance would).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import multiprocessing
import multiprocessing.synchronize
import os
import socket
import time
from dataclasses import dataclass, field

import redis
from rq.exceptions import DequeueTimeout
from rq.job import Job, JobStatus
from rq.queue import Queue

from optuna_rq.errors import ObjectiveLoadError, ObjectiveRefusedError, ProtocolError
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.redis_waits import wait_for_redis
from optuna_rq.protocol import (
    DEFAULT_LEASE_TTL_S,
    RESULT_FIELD,
    RUN_TRIAL,
    FailReason,
    Keys,
    MsgpackSerializer,
    Outcome,
    Record,
    Signer,
    TrialRequest,
    TrialResult,
    trial_queue,
)
from optuna_rq.workers.execute import trial_result
from optuna_rq.workers.loader import load_objective, serve
from optuna_rq.workers.pool_heartbeat import Heartbeat
from optuna_rq.workers.running_attempt import Attempt

__all__ = ["FleetSettings", "SimulatedFleet", "SimulatedPool"]

log = logging.getLogger("benchmarks.fleet")

MAX_WAIT_S = 0.05
"""The longest the loop blocks on the queue: it must also end trials and renew leases on time."""
TAKE_BATCH = 64
"""Jobs dequeued in one round trip at most."""


@dataclass(frozen=True, kw_only=True)
class FleetSettings:
    """What a fleet serves: `workers` simulated workers in `processes` pools on the trial queue
    of `module` under `prefix`, each trial taking `trial_s` seconds."""

    redis_url: str
    prefix: str
    module: str
    workers: int
    processes: int
    trial_s: float
    secret: bytes | None = field(default=None, repr=False)
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S

    def share(self, index: int) -> int:
        """Workers of pool `index`."""
        return self.workers // self.processes + (index < self.workers % self.processes)


@dataclass(order=True)
class _Running:
    due: float  # time.monotonic() the simulated run ends
    seq: int
    attempt: Attempt = field(compare=False)
    request: TrialRequest = field(compare=False)
    job: Job = field(compare=False)
    value: float = field(compare=False)
    slot: str = field(compare=False)
    ended: bool = field(default=False, compare=False)


class SimulatedPool:
    """`workers` simulated workers in this process; `run` serves until `stop` is set."""

    def __init__(self, settings: FleetSettings, workers: int) -> None:
        self.settings = settings
        self.workers = workers
        self.connection = connect(settings.redis_url)
        self.signer = Signer(settings.secret)
        self.keys = Keys(settings.prefix)
        self.queue_name = self.keys.trial_queue(settings.module)
        self.queue = trial_queue(self.connection, self.queue_name)
        self.served = serve([settings.module])
        self.heartbeat = Heartbeat(
            self.connection,
            self.keys,
            self.signer,
            queues=[self.queue_name],
            ttl_s=settings.lease_ttl_s,
        )
        self.ttl_ms = int(settings.lease_ttl_s * 1000)
        host = f"{socket.gethostname()}:{os.getpid()}"
        self.free = [f"{host}.{i}" for i in reversed(range(workers))]  # idle simulated workers
        self.running: dict[str, _Running] = {}  # job id -> its attempt
        self.timers: list[_Running] = []
        self._seq = itertools.count()
        self._next_renewal = 0.0
        self._ending: list[tuple[_Running, bytes]] = []  # sealed results to deliver this turn

    def announce(self) -> None:
        """Write the pool's heartbeat now: its workers count as live from here."""
        self.heartbeat.beat(time.monotonic(), workers=self.workers, busy=0, force=True)

    def run(self, stop: multiprocessing.synchronize.Event) -> None:
        self.announce()
        try:
            while not stop.is_set():
                self.step()
        finally:
            self.heartbeat.stop()

    def step(self) -> None:
        """One turn: end the trials that are due, take jobs for idle workers, renew leases and
        the heartbeat."""
        self._end_due(time.monotonic())
        self._deliver()  # before taking jobs, which may block
        self._take_jobs()
        now = time.monotonic()
        if self.running and now >= self._next_renewal:
            self._renew()
            self._next_renewal = now + self.settings.lease_ttl_s / 4
        self.heartbeat.beat(now, workers=self.workers, busy=len(self.running))
        self._deliver()
        if not self.free:  # every worker busy: sleep until the next trial ends
            time.sleep(max(0.0, min(self._next_due(), MAX_WAIT_S)))

    def _next_due(self) -> float:
        while self.timers and self.timers[0].ended:
            heapq.heappop(self.timers)
        return self.timers[0].due - time.monotonic() if self.timers else MAX_WAIT_S

    def _take_jobs(self) -> None:
        """Dequeue a job per idle worker, as RQ does (LMOVE onto the queue's intermediate list,
        then the job's hash): many in one round trip each, blocking (briefly, with RQ's own
        `Queue.dequeue_any`) only when none is waiting."""
        wanted = min(len(self.free), TAKE_BATCH)
        if not wanted:
            return
        pipe = self.connection.pipeline(transaction=False)
        for _ in range(wanted):
            pipe.lmove(self.queue.key, self.queue.intermediate_queue_key)
        ids = [bytes(i).decode() for i in pipe.execute() if i is not None]
        if ids:
            fetched = Job.fetch_many(ids, self.connection, serializer=MsgpackSerializer)
            jobs = [job for job in fetched if job is not None]
        else:
            try:
                found = Queue.dequeue_any(
                    [self.queue],
                    max(0.001, min(self._next_due(), MAX_WAIT_S)),  # type: ignore[arg-type]
                    connection=self.connection,
                    serializer=MsgpackSerializer,
                )
            except DequeueTimeout:
                found = None
            jobs = [] if found is None else [found[0]]
        taken = [(job, request) for job in jobs if (request := self._open(job)) is not None]
        if taken:
            self._start(taken)

    def _open(self, job: Job) -> TrialRequest | None:
        """The job's request; None (counted refused, the job failed) if it is not one."""
        try:
            if job.func_name != RUN_TRIAL:
                raise ProtocolError(f"refused job function {job.func_name!r}")
            (payload,) = job.args
            body = self.signer.open(Record.REQUEST, payload)
            return TrialRequest.decode(body, max_bytes=self.signer.max_message_bytes)
        except (ProtocolError, TypeError, ValueError) as exc:
            log.error("job %s refused: %s", job.id, exc)
            pipe = self.connection.pipeline(transaction=False)
            pipe.hincrby(self.keys.refused, "request", 1)
            job.set_status(JobStatus.FAILED, pipeline=pipe)
            pipe.lrem(self.queue.intermediate_queue_key, 1, job.id)
            pipe.execute()
            return None

    def _start(self, taken: list[tuple[Job, TrialRequest]]) -> None:
        """Lease the attempts and mark their jobs started, in one round trip; then start the
        simulated runs (or end at once the ones cancelled while queued, or not served)."""
        attempts = []
        pipe = self.connection.pipeline(transaction=False)
        for job, request in taken:
            slot = self.free.pop()
            timeout_s = float(job.timeout) if job.timeout is not None and job.timeout > 0 else None
            lease = Keys.lease(request.attempt_id)
            attempt = Attempt.of(
                request, job_id=job.id, lease=lease, holder=slot, timeout_s=timeout_s
            )
            attempts.append((job, request, attempt, slot))
            pipe.set(attempt.lease, attempt.holder, px=self.ttl_ms)
            pipe.exists(attempt.cancel_mark)
            job.prepare_for_execution(slot, pipeline=pipe)
            pipe.persist(job.key)
            pipe.lrem(self.queue.intermediate_queue_key, 1, job.id)
        replies = pipe.execute()
        started_at = time.time()
        for i, (job, request, attempt, slot) in enumerate(attempts):
            cancelled = bool(replies[5 * i + 1])
            record = _Running(
                due=attempt.started + self.settings.trial_s,
                seq=next(self._seq),
                attempt=attempt,
                request=request,
                job=job,
                value=started_at,
                slot=slot,
            )
            self.running[job.id] = record
            if cancelled:
                self._end(record, attempt.failed(FailReason.CANCELLED, "the study was cancelled"))
                continue
            try:
                load_objective(request.objective, self.served)
            except (ObjectiveRefusedError, ObjectiveLoadError) as exc:
                self._end(record, attempt.failed(FailReason.NOT_ALLOWED, str(exc)))
                continue
            heapq.heappush(self.timers, record)

    def _end_due(self, now: float) -> None:
        while self.timers and (self.timers[0].ended or self.timers[0].due <= now):
            record = heapq.heappop(self.timers)
            if record.ended:
                continue
            result = trial_result(
                record.request,
                Outcome.COMPLETE,
                worker=record.slot,
                started=record.attempt.started,
                values=[record.value],
            )
            self._end(record, result)

    def _end(self, record: _Running, result: TrialResult) -> None:
        """`result` is the attempt's: free its simulated worker; the result goes out with the
        others of this turn (`_deliver`)."""
        record.ended = True
        del self.running[record.job.id]
        self.free.append(record.slot)
        self._ending.append((record, self.signer.seal(Record.RESULT, result.encode())))

    def _deliver(self) -> None:
        """This turn's results in one round trip: for each, what `delivery.deliver` writes
        (the sealed result onto the broker's stream under `RESULT_FIELD`, then the lease
        dropped), then RQ's end of a job whose function returned (`run_trial` returns once its
        result is delivered, whatever the outcome): status finished, the job kept its
        `result_ttl`. A real worker sends each on its own; the writes, and their order per
        trial, are the same."""
        if not self._ending:
            return
        while True:
            try:
                pipe = self.connection.pipeline(transaction=False)
                for record, sealed in self._ending:
                    pipe.xadd(record.request.reply_to, {RESULT_FIELD: sealed})
                    pipe.delete(record.attempt.lease)
                    record.job.set_status(JobStatus.FINISHED, pipeline=pipe)
                    record.job.cleanup(ttl=record.job.result_ttl, pipeline=pipe)
                pipe.execute()
                break
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                wait_for_redis(self.connection, exc, max_backoff_s=10.0)
        self._ending.clear()

    def _renew(self) -> None:
        """Renew every running lease and read the cancel marks, in one round trip."""
        records = list(self.running.values())
        pipe = self.connection.pipeline(transaction=False)
        for record in records:
            pipe.set(record.attempt.lease, record.attempt.holder, px=self.ttl_ms)
            pipe.exists(record.attempt.cancel_mark)
        try:
            replies = pipe.execute()
        except redis.RedisError as exc:
            log.warning("cannot renew trial leases (will keep trying): %s", exc)
            return
        for record, marked in zip(records, replies[1::2], strict=True):
            if marked and not record.ended:
                self._end(
                    record,
                    record.attempt.failed(FailReason.CANCELLED, "the study was cancelled"),
                )


def _pool_main(
    settings: FleetSettings,
    index: int,
    ready: multiprocessing.synchronize.Event,
    stop: multiprocessing.synchronize.Event,
) -> None:
    logging.basicConfig(level=logging.WARNING)
    pool = SimulatedPool(settings, settings.share(index))
    pool.announce()
    ready.set()
    pool.run(stop)


class SimulatedFleet:
    """`settings.processes` processes of simulated workers; `start` returns once every pool's
    heartbeat is written, `stop` ends them (their heartbeats removed)."""

    def __init__(self, settings: FleetSettings) -> None:
        if not 1 <= settings.processes <= settings.workers:
            raise ValueError(
                f"processes={settings.processes}: give 1 to workers ({settings.workers})"
            )
        self.settings = settings
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._ready = [context.Event() for _ in range(settings.processes)]
        self.processes = [
            context.Process(
                target=_pool_main,
                args=(settings, i, self._ready[i], self._stop),
                name=f"fleet-{i}",
                daemon=True,
            )
            for i in range(settings.processes)
        ]

    def start(self, timeout_s: float = 60.0) -> SimulatedFleet:
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + timeout_s
        for process, ready in zip(self.processes, self._ready, strict=True):
            while not ready.wait(0.1):
                if not process.is_alive() or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"simulated pool {process.name} did not start")
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes if p.pid is not None]

    def stop(self) -> None:
        self._stop.set()
        for process in self.processes:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> SimulatedFleet:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
