"""The dispatch loop: ask -> process -> enqueue; results -> tell -> acknowledge -> refill.

The cap is exact: a study never has more than `concurrency` trials sent to workers and not yet
told. A result is told at most once (stale or repeated results are acknowledged, counted and
dropped), and only then is its slot refilled. A trial is asked when a slot frees, so the sampler
sees what `study.optimize` with as many threads would: at cap 1, the same params for a seed.
A study may ask ahead instead (`StudyRun.ask_ahead`, `submit --ask-ahead N`): at its cap it keeps
N trials sampled while the workers run, RUNNING in the storage but not sent, that go out the
moment a slot frees, in the same round trip as the acknowledgement; the sampler then sees N
trials more than the cap running. Lost attempts are failed and retried (`retries`).

Nothing told to a study storage is acknowledged before it is durable: `persist` (the daemon's
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

import optuna
import redis
from optuna.trial import TrialState
from redis.exceptions import OutOfMemoryError

from optuna_rq.dispatch.boundary import FaultBoundary, Site, passes_through
from optuna_rq.dispatch.calls import CallServer
from optuna_rq.dispatch.observer import DispatchObserver
from optuna_rq.dispatch.offloop import OffLoopSampling
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.dispatch.results import ResultStream, arrival_s, verdict_of
from optuna_rq.dispatch.retries import Retries
from optuna_rq.dispatch.runs import InFlight, Phase, StudyRun
from optuna_rq.dispatch.sending import TrialSender
from optuna_rq.errors import ConfigError, StudyStorageError
from optuna_rq.plumbing import failpoints
from optuna_rq.plumbing.connection import wait_for_redis
from optuna_rq.protocol import (
    CALL_FIELD,
    DEFAULT_LEASE_TTL_S,
    RESULT_FIELD,
    FailReason,
    Keys,
    Signer,
)
from optuna_rq.sampling.sampler_messages import Sampled, SampleFailed
from optuna_rq.study.optuna_trials import create_running_trial
from optuna_rq.study.verdict import Verdict, fail_orphans, tell, worker_lost

__all__ = ["ASK_BUDGET_S", "Dispatcher"]

log = logging.getLogger("optuna_rq.dispatch")

ASK_BUDGET_S = 0.02
"""How long one refill may sample (ask and `process()`) before what it has is sent and the
result stream is read again: results, acknowledgements and remote-trial calls wait no longer
than this (and one ask) behind a batch of asks; the slots left are filled on the next turn."""

_CANCELLED = Verdict(
    state=TrialState.FAIL,
    fail_reason=FailReason.CANCELLED,
    error="the study was cancelled before this trial ended",
)


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
        """Publishes each trial as it is sent and told, for `optuna-rq trials` (by default,
        nowhere)."""
        self.persist = persist or _nothing_to_persist
        """Makes every change told to the storages durable; run before anything that
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
        self.retries = Retries(
            connection,
            keys=self.keys,
            reply_to=reply_to,
            intermediate_key=self.sender.intermediate_key,
            grace_s=lease_grace_s,
            check_s=lease_check_s,
            boundary=self.boundary,
            finish=self._finish,
            send=self._send,
        )

    @property
    def refused_results(self) -> int:
        """Results refused: not valid, or not validly signed."""
        return self.results.refused

    @property
    def dropped_results(self) -> int:
        """Results stale or repeated: acknowledged, counted, never told."""
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
        """Send trials until every study is at its cap or has asked its budget, one study at a
        time round the studies (first the trials asked but not known to be enqueued: after a
        restart or an outage), or until sampling has taken `ASK_BUDGET_S`; then ask ahead. The
        sends and the pending acknowledgements go to Redis in one round trip."""
        if any(run.count(Phase.UNSENT) for run in self.runs.values()):
            self._send_unsent()
        # One MULTI/EXEC, as RQ's own enqueue is: a connection lost midway enqueues all or none,
        # never a job saved but not pushed onto the queue (it would look queued forever).
        pipe = self.connection.pipeline(transaction=True)
        sending: list[tuple[StudyRun, InFlight]] = []
        self._take_sampled(pipe, sending)
        started = time.perf_counter()
        wanting = [run for run in self.runs.values() if self._can_refill(run)]
        while wanting:  # one trial per study per pass: a slow sampler holds up no other study
            for run in wanting:
                off_loop = False
                with self.boundary.guard(run.name, Site.ASK):
                    off_loop = self.off_loop.takes(run)
                    if off_loop:
                        self.off_loop.request(run, run.free_slots)  # sent after the flush below
                if off_loop or self.boundary.faulted(run.name):
                    continue
                if sending and time.perf_counter() - started > ASK_BUDGET_S:
                    if run.next_asked_ahead() is None:
                        wanting = []  # the rest after the stream is read: `behind`
                        break
                self._refill_one(run, pipe, sending)
            wanting = [run for run in wanting if self._can_refill(run)]
        self._note_sent(sending)
        self.results.ack_into(pipe)
        published = self.publication.into(pipe)
        if len(pipe) or self.off_loop.has_outbox:
            self.persist()  # what the sends, the acknowledgements and the requests stand on
        if len(pipe):
            pipe.execute()  # on an outage, the sends stay unsent and the acks pending: redone
        self.off_loop.send()
        self.results.acked()
        self.publication.written(published)
        now = time.time()
        for run, record in sending:
            run.mark_sent(record, now)
        self._ask_ahead()
        return len(sending)

    def _note_sent(self, sending: list[tuple[StudyRun, InFlight]]) -> None:
        """Publish the trials about to be sent, RUNNING, in the write that sends them."""
        for run, record in sending:
            with self.boundary.guard(run.name, Site.SEND):
                self.publication.note(run.study, record.trial)

    def _refill_one(
        self, run: StudyRun, pipe: Any, sending: list[tuple[StudyRun, InFlight]]
    ) -> None:
        """Fill one slot of `run`: with its oldest trial asked ahead, or one asked now."""
        payload: bytes | None = None
        with self.boundary.guard(run.name, Site.ASK):
            record = run.next_asked_ahead()  # the oldest: asked first, sent first
            if record is None:
                # CPU time, not wall: on a busy machine a preempted ask is not a slow one
                sampling_started = time.thread_time()
                record = run.track(self._ask(run), attempt=1, phase=Phase.UNSENT)
                payload = self._seal(run, record)
                self.off_loop.note(run, time.thread_time() - sampling_started)
            else:
                payload = run.occupy(record) or self._seal(run, record)
        if payload is not None:
            self._enqueue(run, record, payload, pipe, sending)

    def _enqueue(
        self,
        run: StudyRun,
        record: InFlight,
        payload: bytes,
        pipe: Any,
        sending: list[tuple[StudyRun, InFlight]],
    ) -> None:
        """Put `record`'s job in the turn's batch `pipe`."""
        if self.boundary.faulted(run.name):
            return  # its trial ends with it (`cancel`)
        with self.boundary.guard(run.name, Site.SEND):
            self.sender.enqueue(run, record, payload, pipe)
            sending.append((run, record))

    def _can_refill(self, run: StudyRun) -> bool:
        return (
            run.wants_trial and not self.off_loop.busy(run) and not self.boundary.faulted(run.name)
        )

    def _take_sampled(self, pipe: Any, sending: list[tuple[StudyRun, InFlight]]) -> None:
        """Create the trials the sampler process sampled, and enqueue them in `pipe`; ask on
        the loop those it could not sample."""
        for run, answer in self.off_loop.take():
            if self.runs.get(run.name) is not run or self.boundary.faulted(run.name):
                continue
            payload: bytes | None = None
            with self.boundary.guard(run.name, Site.ASK):
                if isinstance(answer, SampleFailed):
                    trial = self._ask(run)
                else:
                    assert isinstance(answer, Sampled)
                    trial = create_running_trial(
                        run.study,
                        params=answer.params,
                        distributions=answer.distributions,
                        user_attrs=answer.user_attrs,
                        system_attrs=answer.system_attrs,
                    )
                    self.observer.asked(run.name, answer.sample_s)
                record = run.track(trial, attempt=1, phase=Phase.UNSENT)
                payload = self._seal(run, record)  # the params are set: `process()` reads them
            if payload is not None:
                self._enqueue(run, record, payload, pipe, sending)

    def _ask_ahead(self) -> None:
        """Sample the next trials of the studies at their cap that ask ahead, while their
        workers run."""
        for run in self.runs.values():
            with self.boundary.guard(run.name, Site.ASK):
                while (
                    0 < run.limit <= run.n_outstanding
                    and run.count(Phase.ASKED_AHEAD) < run.spec.ask_ahead
                    and run.budget.left > 0
                    and not self.boundary.faulted(run.name)
                ):
                    record = run.track(self._ask(run), attempt=1, phase=Phase.ASKED_AHEAD)
                    record.payload = self._seal(run, record)

    def _ask(self, run: StudyRun) -> optuna.Trial:
        started = time.perf_counter()
        trial = run.study.ask()
        self.observer.asked(run.name, time.perf_counter() - started)
        run.budget.spend()
        failpoints.hit("after_ask")
        return trial

    def _send(self, run: StudyRun, record: InFlight) -> None:
        """Enqueue the unsent trial `record` on its own."""
        with self.boundary.guard(run.name, Site.SEND):
            payload = self._seal(run, record)
            if payload is not None:
                self.persist()
                self.sender.enqueue(run, record, payload, None)
                run.mark_sent(record, time.time())
                self.publication.note(run.study, record.trial)  # published with the next write

    def _seal(self, run: StudyRun, record: InFlight) -> bytes | None:
        """The trial's sealed request; None if Optuna rejects the space: the trial is then told
        FAIL, never left RUNNING."""
        try:
            return self.sender.seal(run, record)
        except StudyStorageError:
            raise  # the storage failed, not the space: nothing to tell it
        except Exception as exc:
            log.error("study %r trial %d could not be sampled: %s", run.name, record.number, exc)
            error = str(exc)
            verdict = Verdict(state=TrialState.FAIL, fail_reason=FailReason.EXCEPTION, error=error)
            self._finish(run, record, verdict)
            return None

    def _send_unsent(self) -> None:
        """Enqueue the unsent trials whose job does not exist. Results are read first: a job
        that finished while nobody watched is gone, and its result waits in the stream. Beyond
        the cap (a trial asked ahead before a restart) they wait, asked ahead, for a slot."""
        self._drain()
        for run in self.runs.values():
            if self.boundary.faulted(run.name):
                continue
            with self.boundary.guard(run.name, Site.SEND):
                unsent = sorted(run.in_phase(Phase.UNSENT), key=lambda r: r.number)
                exist = self.sender.jobs_exist(run, unsent)
                for record in [r for r, e in zip(unsent, exist, strict=True) if e]:
                    run.mark_sent(record, None)  # enqueued before the restart or the outage
                for record in [r for r, e in zip(unsent, exist, strict=True) if not e]:
                    if run.n_outstanding > run.limit:
                        run.set_aside(record)
                    elif not self.boundary.faulted(run.name):
                        log.info("study %r: enqueueing trial %d again", run.name, record.number)
                        self._send(run, record)

    # -- results -> tell -> acknowledge --------------------------------------------------------

    @property
    def behind(self) -> bool:
        """Whether a study has a free slot it could fill: the loop must not wait on the
        stream (`poll(None)`) but refill again."""
        return any(self._can_refill(run) for run in self.runs.values())

    def poll(self, block_s: float | None = 1.0) -> int:
        """Read the results that arrived (waiting up to `block_s`; None: not at all), tell
        them, and fail the attempts whose workers are lost; return how many trials were told."""
        handled, _entries = self._read(block_s)
        return handled + self.retries.check(self.runs, self._drain)

    def _drain(self) -> None:
        """Read and tell every result already in the stream."""
        while self._read(None)[1]:
            pass

    def _read(self, block_s: float | None) -> tuple[int, int]:
        """One read of the result stream: (trials told, entries read)."""
        entries = self.results.read(block_s)
        handled = 0
        for entry_id, fields in entries:
            if CALL_FIELD in fields:
                self.calls.serve(fields[CALL_FIELD], self.live)
            else:
                handled += self._handle(fields.get(RESULT_FIELD, b""), entry_id)
        if self.calls.replies:
            try:
                self.persist()  # what the calls changed (a suggested param, a report) is durable
            except BaseException:
                self.calls.drop_replies()  # unacknowledged, these calls are read again
                raise
            self.calls.send_replies()
        if entries:
            # Acknowledged only after telling: a broker that dies in between reads them again,
            # and telling is idempotent. Where the told trials' slots are refilled, with those
            # sends.
            self.results.handled([entry_id for entry_id, _fields in entries])
            if not self.behind:  # else they go with the sends that fill the told trials' slots
                self.flush()
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

    def wind_down(self, run: StudyRun, why: str) -> None:
        """No new trials for `run`: the trials running on workers finish and are told, as
        `study.optimize` lets them after `study.stop()`; those asked ahead, never sent, end
        FAIL (`cancelled`, with `why`)."""
        self.off_loop.forget(run)
        run.budget.wind_down()
        for record in list(run.in_phase(Phase.ASKED_AHEAD)):
            verdict = Verdict(state=TrialState.FAIL, fail_reason=FailReason.CANCELLED, error=why)
            self._finish(run, record, verdict)

    # -- the loop ------------------------------------------------------------------------------

    def run_until_done(
        self,
        stop: threading.Event | None = None,
        poll_s: float = 0.5,
        give_up_after_s: float = 600.0,
    ) -> None:
        """Refill and poll until every study has told its budget, or `stop` is set. A Redis
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
                self.cancel(run, why=f"the study failed: {fault}", orphans=True)
            except Exception:
                self.abandon(run)
            self.boundary.faults.clear()  # what the cancel met is the same study's
        self.flush()
        first = next(iter(faults.values()))
        raise first.cause

    def flush(self) -> None:
        """Acknowledge the results told and not yet acknowledged, and publish the trials noted
        and not yet published, in one write once what they stand on is durable."""
        if not self.publication.pending:
            self.results.flush()
            return
        self.persist()
        pipe = self.connection.pipeline(transaction=False)
        self.results.ack_into(pipe)
        published = self.publication.into(pipe)
        pipe.execute()
        self.results.acked()
        self.publication.written(published)

    def cancel_outstanding(self) -> None:
        """Withdraw queued jobs and end every outstanding trial FAIL with reason `cancelled`."""
        for run in self.runs.values():
            self.cancel(run)

    def cancel(self, run: StudyRun, why: str | None = None, *, orphans: bool = False) -> None:
        """No new trials for `run`; its queued jobs are withdrawn, its running objectives are
        stopped on their workers (`Keys.cancel`), and its trials in flight end FAIL
        (`cancelled`, with `why`). A result that still arrives from a running one is dropped as
        stale. With `orphans` (a study that faulted), every trial still RUNNING in its storage
        ends the same way: an ask that raised after creating its trial left one nobody holds."""
        self.off_loop.forget(run)
        run.budget.wind_down()
        with self.boundary.guard(run.name, Site.WITHDRAW):
            self.sender.withdraw(run, list(run.in_phase(Phase.UNSENT, Phase.SENT)))
        verdict = (
            _CANCELLED
            if why is None
            else Verdict(state=TrialState.FAIL, fail_reason=FailReason.CANCELLED, error=why)
        )
        for record in run.in_flight():
            try:
                self._finish(run, record, verdict)
            except Exception as exc:
                if not orphans or passes_through(exc):
                    raise
                # The study's sampler may be what broke (a tell runs its after_trial): the
                # trial ends below, through the storage alone.
                log.error("study %r trial %d: %s", run.name, record.number, exc)
        if orphans:
            self.fail_orphans(run, verdict)

    def fail_orphans(self, run: StudyRun, verdict: Verdict) -> None:
        """End FAIL every trial of `run`'s study still RUNNING in its storage that nobody holds
        (`verdict.fail_orphans`), counted as every trial that ends."""
        ended = fail_orphans(run.study, verdict)
        if ended:
            self.observer.ended(run.name, TrialState.FAIL.name, verdict.fail_reason, count=ended)

    def abandon(self, run: StudyRun) -> None:
        """Stop dispatching `run` without a word to its storage (which failed): its queued jobs
        are withdrawn, and results that still arrive from its running trials are dropped as
        stale. Results read and not yet acknowledged are read again, so that the other
        studies' are told even if the failure cut a batch short."""
        self.runs.pop(run.name, None)
        self.off_loop.drop(run)
        self.publication.forget(run.name)  # told, maybe not durable: not to be published
        try:
            self.sender.withdraw(run, list(run.in_phase(Phase.UNSENT, Phase.SENT)))
        except Exception as exc:
            if passes_through(exc):
                raise
            # Their jobs then run and report, and the results are dropped as stale.
            log.error("study %r: its queued trials were not withdrawn: %s", run.name, exc)
        for record in run.in_flight():
            if record.holds_slot:
                self.retries.forget(run, record)
        self.results.after_outage()

    def fail_outstanding(self, error: str) -> None:
        """End every trial in flight FAIL (`worker_lost`) without a word to Redis: for a broker
        that cannot go on, so that no trial is left RUNNING."""
        for run in self.runs.values():
            for record in run.in_flight():
                self._finish(run, record, worker_lost(error))

    def close(self) -> None:
        """Remove this dispatcher's result stream (for a private, per-run stream)."""
        self.results.close()

    def stop_sampling(self) -> None:
        """End the sampler process, if one was started (the broker stops)."""
        self.off_loop.close()
