"""Filling free slots: ask -> process -> enqueue, for every study the dispatcher runs.

A trial is asked when a slot frees, so the sampler sees what `study.optimize` with as many
threads would: at cap 1, the same params for a seed. A study may ask ahead instead
(`RunSpec.ask_ahead`, `submit --ask-ahead N`): at its cap it keeps N trials sampled while the
workers run, RUNNING in the storage but not sent, that go out the moment a slot frees, in the same
round trip as the acknowledgement; the sampler then sees N trials more than the cap running.
Studies whose sampling is slow sample in the sampler process (`offloop`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna
import redis
from optuna.trial import TrialState

from optuna_rq.dispatch.boundary import FaultBoundary, Site
from optuna_rq.dispatch.observer import DispatchObserver
from optuna_rq.dispatch.offloop import OffLoopSampling
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.dispatch.results import ResultStream
from optuna_rq.dispatch.runs import InFlight, Phase, StudyRun
from optuna_rq.dispatch.sending import TrialSender
from optuna_rq.errors import StudyStorageError
from optuna_rq.plumbing import failpoints
from optuna_rq.protocol import FailReason
from optuna_rq.sampling.sampler_messages import Sampled, SampleFailed
from optuna_rq.study.optuna_trials import create_running_trial
from optuna_rq.study.verdict import Verdict

__all__ = ["ASK_BUDGET_S", "Refill"]

log = logging.getLogger("optuna_rq.dispatch")

ASK_BUDGET_S = 0.02
"""How long one refill may sample (ask and `process()`) before what it has is sent and the
result stream is read again: results, acknowledgements and remote-trial calls wait no longer
than this (and one ask) behind a batch of asks; the slots left are filled on the next turn."""


class Refill:
    """The dispatcher's sending half: it fills the free slots of the runs in `runs` (the
    dispatcher's own mapping), through the dispatcher's collaborators. A trial it cannot send
    ends through `finish`, the dispatcher's one way a trial ends."""

    def __init__(
        self,
        connection: redis.Redis,
        runs: Mapping[str, StudyRun],
        *,
        boundary: FaultBoundary,
        sender: TrialSender,
        results: ResultStream,
        publication: TrialPublication,
        off_loop: OffLoopSampling,
        observer: DispatchObserver,
        persist: Callable[[], None],
        finish: Callable[[StudyRun, InFlight, Verdict], None],
        drain: Callable[[], None],
    ) -> None:
        self.connection = connection
        self.runs = runs
        self.boundary = boundary
        self.sender = sender
        self.results = results
        self.publication = publication
        self.off_loop = off_loop
        self.observer = observer
        self.persist = persist
        self.finish = finish
        self.drain = drain  # reads and reports every result already in the stream

    def fill(self) -> int:
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
        wanting = [run for run in self.runs.values() if self.can_fill(run)]
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
            wanting = [run for run in wanting if self.can_fill(run)]
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

    def can_fill(self, run: StudyRun) -> bool:
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

    def send(self, run: StudyRun, record: InFlight) -> None:
        """Enqueue the unsent trial `record` on its own."""
        with self.boundary.guard(run.name, Site.SEND):
            payload = self._seal(run, record)
            if payload is not None:
                self.persist()
                self.sender.enqueue(run, record, payload, None)
                run.mark_sent(record, time.time())
                self.publication.note(run.study, record.trial)  # published with the next write

    def _seal(self, run: StudyRun, record: InFlight) -> bytes | None:
        """The trial's sealed request; None if Optuna rejects the space: the trial is then recorded
        FAIL, never left RUNNING."""
        try:
            return self.sender.seal(run, record)
        except StudyStorageError:
            raise  # the storage failed, not the space: nothing to tell it
        except Exception as exc:
            log.error("study %r trial %d could not be sampled: %s", run.name, record.number, exc)
            error = str(exc)
            verdict = Verdict(state=TrialState.FAIL, fail_reason=FailReason.EXCEPTION, error=error)
            self.finish(run, record, verdict)
            return None

    def _send_unsent(self) -> None:
        """Enqueue the unsent trials whose job does not exist. Results are read first: a job
        that finished while nobody watched is gone, and its result waits in the stream. Beyond
        the cap (a trial asked ahead before a restart) they wait, asked ahead, for a slot."""
        self.drain()
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
                        self.send(run, record)
