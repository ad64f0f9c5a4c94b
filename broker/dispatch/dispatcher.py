"""The dispatch loop: ask -> process -> enqueue; results -> tell -> acknowledge -> refill.

The cap is exact: a study never has more than `concurrency` trials sent to workers and not yet
recorded. A result is recorded at most once (stale or repeated results are acknowledged, counted and
dropped), and only then is its slot refilled (`refill`: how trials are asked and sent). Lost
attempts are failed and retried (`retries`).

Nothing recorded in a study storage is acknowledged before it is durable: `persist` (the daemon's
`Storages.flush`; nothing for storages that write through) runs before the trials are sent and
the results acknowledged, and before remote-trial calls are answered.

Whatever it does for one study it does under that study's fault guard (`boundary`): a study that
faults takes no further part (no trial sampled or sent, its results dropped, its calls refused)
until its owner (the daemon's registry, or the Optimizer) ends it.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import OutOfMemoryError

from optuna_rq.dispatch.boundary import FaultBoundary, Site
from optuna_rq.dispatch.calls import CallServer
from optuna_rq.dispatch.endings import RunEndings
from optuna_rq.dispatch.observer import DispatchObserver
from optuna_rq.dispatch.offloop import OffLoopSampling
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.dispatch.refill import Refill
from optuna_rq.dispatch.results import ResultStream, arrival_s, verdict_of
from optuna_rq.dispatch.retries import Retries
from optuna_rq.dispatch.runs import InFlight, StudyRun
from optuna_rq.dispatch.sending import TrialSender
from optuna_rq.errors import ConfigError
from optuna_rq.plumbing import failpoints
from optuna_rq.plumbing.redis_waits import wait_for_redis
from optuna_rq.protocol import (
    CALL_FIELD,
    DEFAULT_LEASE_TTL_S,
    RESULT_FIELD,
    FailReason,
    Keys,
    Signer,
)
from optuna_rq.study.verdict import Verdict, tell

__all__ = ["Dispatcher"]

log = logging.getLogger("optuna_rq.dispatch")


def _nothing_to_persist() -> None:
    """Storages that write through (or a caller's own study) need no flush."""


class Dispatcher:
    """Runs studies on RQ workers through their queues (one per objective module and resource
    class, `TrialSender`) and one result stream.

    Not thread-safe: one thread drives it (`run_until_done`, or `refill` and `poll`).
    """

    def __init__(
        self,
        connection: redis.Redis,
        *,
        prefix: str,
        reply_to: str,
        consumer: str | None = None,
        signer: Signer | None = None,
        observer: DispatchObserver | None = None,
        lease_grace_s: float = DEFAULT_LEASE_TTL_S,
        lease_check_s: float = 0.25,
        persist: Callable[[], None] | None = None,
        off_loop: OffLoopSampling | None = None,
        wake: str | None = None,
        publication: TrialPublication | None = None,
    ) -> None:
        self.connection = connection
        self.publication = publication or TrialPublication(None, Signer())
        """Publishes each trial as it is sent and as it ends, for `optuna-rq trials` (by default,
        nowhere)."""
        self.persist = persist or _nothing_to_persist
        """Makes every change recorded in the storages durable; run before anything that
        acknowledges one goes to Redis."""
        self.signer = signer or Signer()
        self.observer = observer or DispatchObserver()
        self.prefix = prefix
        self.keys = Keys(prefix)
        self.runs: dict[str, StudyRun] = {}
        self.boundary = FaultBoundary()
        """The studies that faulted: they take no further part, until their owner ends them."""
        self.sender = TrialSender(connection, keys=self.keys, reply_to=reply_to, signer=self.signer)
        self.results = ResultStream(
            connection,
            prefix=prefix,
            reply_to=reply_to,
            consumer=consumer or f"{socket.gethostname()}:{os.getpid()}",
            signer=self.signer,
            observer=self.observer,
            before_ack=self.persist,
            wake=wake,
        )
        self.calls = CallServer(
            connection,
            prefix=prefix,
            reply_to=reply_to,
            signer=self.signer,
            observer=self.observer,
            boundary=self.boundary,
        )
        self.off_loop = off_loop or OffLoopSampling(None)
        """Studies whose sampling is slow sample in its process, if it has one (`offloop`)."""
        self.on_told: Callable[[StudyRun, int], None] | None = None
        """Called with the run and the trial number after every tell (Optimizer callbacks)."""
        self.on_turn: Callable[[], None] | None = None
        """Called once per turn of `run_until_done` (a remote Optimizer's status and liveness:
        `optuna_rq.optimizer_run.run_status`); a turn waits on the result stream at most its
        `poll_s`."""
        self.filler = Refill(
            connection,
            self.runs,
            boundary=self.boundary,
            sender=self.sender,
            results=self.results,
            publication=self.publication,
            off_loop=self.off_loop,
            observer=self.observer,
            persist=self.persist,
            finish=self._finish,
            drain=self._drain,
        )
        self.retries = Retries(
            connection,
            keys=self.keys,
            reply_to=reply_to,
            intermediate_key=self.sender.intermediate_key,
            grace_s=lease_grace_s,
            check_s=lease_check_s,
            boundary=self.boundary,
            finish=self._finish,
            send=self.filler.send,
        )
        self.endings = RunEndings(
            self.runs,
            boundary=self.boundary,
            sender=self.sender,
            results=self.results,
            publication=self.publication,
            off_loop=self.off_loop,
            observer=self.observer,
            finish=self._finish,
            forget_attempt=self.retries.forget,
        )
        """Ends a study's trials in flight all at once: wind down, cancel, abandon, fail."""

    @property
    def refused_results(self) -> int:
        """Results refused: not valid, or not validly signed."""
        return self.results.refused

    @property
    def dropped_results(self) -> int:
        """Results stale or repeated: acknowledged, counted, never recorded."""
        return self.results.dropped

    @property
    def lost_attempts(self) -> int:
        """Attempts whose worker was lost."""
        return self.retries.lost_attempts

    def add(self, run: StudyRun) -> None:
        if run.name in self.runs:
            raise ConfigError(f"study {run.name!r} is already being dispatched")
        self.runs[run.name] = run
        self.results.ensure_group()

    def remove(self, name: str) -> StudyRun | None:
        """Take study `name` out of dispatch (it ended, or is ending): nothing of it stays."""
        run = self.runs.pop(name, None)
        if run is not None:
            self.off_loop.drop(run)
        return run

    def after_outage(self) -> None:
        """Redis was unreachable: read unacknowledged results again, and give every lease time
        to be renewed before counting it lost."""
        self.retries.reset()
        self.results.after_outage()

    # -- ask -> process -> enqueue -------------------------------------------------------------
    def refill(self) -> int:
        """Send trials into every free slot (`Refill.fill`); how many were sent."""
        return self.filler.fill()

    # -- results -> tell -> acknowledge --------------------------------------------------------

    @property
    def behind(self) -> bool:
        """Whether a study has a free slot it could fill: the loop must not wait on the
        stream (`poll(None)`) but refill again."""
        return any(self.filler.due(run) for run in self.runs.values())

    def poll(self, block_s: float | None = 1.0) -> int:
        """Read the results that arrived (waiting up to `block_s`; None: not at all), tell
        them, and fail the attempts whose workers are lost; return how many trials were recorded."""
        handled, _entries = self._read(block_s)
        return handled + self.retries.check(self.runs, self._drain)

    def _drain(self) -> None:
        """Read and tell every result already in the stream."""
        while self._read(None)[1]:
            pass

    def _read(self, block_s: float | None) -> tuple[int, int]:
        """One read of the result stream: (trials recorded, entries read)."""
        entries = self.results.read(block_s)
        handled = 0
        read_results = False
        for entry_id, fields in entries:
            if CALL_FIELD in fields:
                self.calls.serve(fields[CALL_FIELD], self.live)
            else:
                read_results = True
                handled += self._handle(fields.get(RESULT_FIELD, b""), entry_id)
        # Acknowledged only after recording: a broker that dies in between reads them again, and
        # recording is idempotent. Calls that answer nothing (a `report`) are acknowledged with
        # the next read (`ResultStream.read`), before the loop waits: the trial's next call
        # (its `should_prune`) follows at once, and is read in the same round trip.
        quiet = not read_results and not self.calls.replies
        self.results.handled([entry_id for entry_id, _fields in entries], with_read=quiet)
        if self.calls.replies:
            self.flush()  # the answers now, with the acknowledgements: the objectives wait
        elif entries and not quiet and not self.behind:
            self.flush()  # else with the sends that fill the recorded trials' slots
        return handled, len(entries)

    def _handle(self, raw: bytes, entry_id: bytes) -> int:
        """Tell the result in `raw` (1), or refuse or drop it (0)."""
        result = self.results.open(raw)
        if result is None:
            return 0
        run = self.live(result.study)
        record = None if run is None else run.answers(result)
        if run is None or record is None:
            self.results.drop(result)
            return 0
        with self.boundary.guard(run.name, Site.TELL):
            return self._tell(run, record, result, entry_id)
        return 0  # the study faulted: it ends, its trials with it

    def live(self, name: str) -> StudyRun | None:
        """The run of study `name`, if it is dispatched and has not faulted."""
        run = self.runs.get(name)
        return None if run is None or self.boundary.faulted(name) else run

    def _tell(self, run: StudyRun, record: InFlight, result: Any, entry_id: bytes) -> int:
        if result.fail_reason is FailReason.WORKER_LOST:  # its supervisor saw the worker die
            self.retries.lost(run, record, result.error or "the worker was lost")
            return 1
        failpoints.hit("before_tell")
        arrived = arrival_s(entry_id)
        self._finish(run, record, verdict_of(result))
        enqueued = record.enqueued_at
        self.observer.delivered(
            start_delay_s=None if enqueued is None else arrived - result.duration_s - enqueued,
            result_age_s=time.time() - arrived if arrived else None,
        )
        return 1

    def _finish(self, run: StudyRun, record: InFlight, verdict: Verdict) -> None:
        """Tell the trial in flight `record` its verdict and take it out of `run`: the one way
        a trial the dispatcher holds ends (a result, a lost worker, a cancel, a wind-down, a
        trial that could not be sampled), so that each is counted here once (`observer`)."""
        started = time.perf_counter()
        state = tell(run.study, record.trial, verdict)
        tell_s = time.perf_counter() - started
        failpoints.hit("after_tell")
        self.publication.note(run.study, record.trial)  # written with the ack, or the status
        run.note(verdict)
        if record.holds_slot:
            self.retries.forget(run, record)
        run.finish(record.number)
        self.observer.ended(run.name, state.name, verdict.fail_reason, tell_s=tell_s)
        if self.on_told is not None:
            self.on_told(run, record.number)

    # -- the loop ------------------------------------------------------------------------------

    def run_until_done(
        self,
        stop: threading.Event | None = None,
        poll_s: float = 0.5,
        give_up_after_s: float = 600.0,
    ) -> None:
        """Refill and poll until every study has recorded its budget, or `stop` is set. A Redis
        outage is ridden out (trials keep running on the workers, their results wait); one
        longer than `give_up_after_s` raises RedisUnavailableError."""
        stop = stop or threading.Event()
        while not all(run.done for run in self.runs.values()):
            if stop.is_set():
                self.cancel_outstanding()
                return
            try:
                self.refill()
                self.poll(None if self.behind else poll_s)
                if self.on_turn is not None:
                    self.on_turn()
            except (redis.ConnectionError, redis.TimeoutError, OutOfMemoryError) as exc:
                if wait_for_redis(self.connection, exc, stop=stop, give_up_s=give_up_after_s):
                    self.after_outage()
            if self.boundary.faults:
                self._raise_fault()
        self.flush()

    def _raise_fault(self) -> None:
        """End the runs that faulted (their trials in flight FAIL `cancelled`), and raise the
        first fault's exception: the caller of `run_until_done` runs one study of its own, and
        learns what broke it as `study.optimize` would tell it."""
        faults = dict(self.boundary.faults)
        self.boundary.faults.clear()
        for name, fault in faults.items():
            run = self.remove(name)
            if run is None:
                continue
            try:
                self.endings.cancel(run, why=f"the study failed: {fault}", orphans=True)
            except Exception:
                self.endings.abandon(run)
            self.boundary.faults.clear()  # what the cancel met is the same study's
        self.flush()
        first = next(iter(faults.values()))
        raise first.cause

    def flush(self) -> None:
        """Send the answers to the calls served, acknowledge the results recorded, and publish
        the trials noted, not yet done, in one write once what they stand on is durable."""
        if not self.publication.pending and not self.calls.replies:
            self.results.flush()
            return
        self.results.with_next_write()
        try:
            self.persist()  # what the calls changed (a suggested param, a report) is durable
        except BaseException:
            self.calls.drop_replies()  # unacknowledged, these calls are read again
            raise
        pipe = self.connection.pipeline(transaction=False)
        sent = self.calls.replies_into(pipe)
        self.results.ack_into(pipe)
        published = self.publication.into(pipe)
        pipe.execute()
        self.calls.sent(sent)
        self.results.acked()
        self.publication.written(published)

    def cancel_outstanding(self) -> None:
        """Withdraw queued jobs and end every outstanding trial FAIL with reason `cancelled`."""
        for run in self.runs.values():
            self.endings.cancel(run)

    def close(self) -> None:
        """Remove this dispatcher's result stream (for a private, per-run stream)."""
        self.results.close()

    def stop_sampling(self) -> None:
        """End the sampler process, if one was started (the broker stops)."""
        self.off_loop.close()
