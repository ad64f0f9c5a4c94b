"""Filling free slots: ask -> process -> enqueue, for every study the dispatcher runs.

A trial is asked when a slot frees, so the sampler sees what `study.optimize` with as many
threads would: at cap 1, the same params for a seed. A study may ask ahead instead
(`RunSpec.ask_ahead`, `submit --ask-ahead N`): at its cap it keeps N trials sampled while the
workers run, RUNNING in the storage but not sent, that go out the moment a slot frees, in the same
round trip as the acknowledgement; the sampler then sees N trials more than the cap running.
Studies whose sampling is slow sample in the sampler process (`offloop`). A study may send its
trials in batches (`RunSpec.batch`, `submit --batch N`): up to N of one turn's trials go in one
RQ job, which a worker runs one after another (`StudyRun.batch_due`: when a study fills its
slots).
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
        sending: list[tuple[StudyRun, InFlight, bytes]] = []
        self._take_sampled(sending)
        started = time.perf_counter()
        wanting = [run for run in self.runs.values() if self.due(run)]
        while wanting:  # one trial per study per pass: a slow sampler holds up no other study
            for run in wanting:
                off_loop = False
                with self.boundary.guard(run.name, Site.ASK):
                    off_loop = self.off_loop.takes(run)
                    if off_loop:
                        self.off_loop.request(run, run.free_slots)  # sent after the flush below
                if off_loop or self.boundary.faulted(run.name):
                    continue
                if self._may_go_on(run, sending, started):
                    self._refill_one(run, sending)
            # The rest after the stream is read: `behind`.
            wanting = [
                r for r in wanting if self.can_fill(r) and self._may_go_on(r, sending, started)
            ]
        jobs = self._enqueue_all(sending, pipe)
        self._note_sent(jobs)
        self.results.ack_into(pipe)
        published = self.publication.into(pipe)
        if len(pipe) or self.off_loop.has_outbox:
            self.persist()  # what the sends, the acknowledgements and the requests stand on
        if len(pipe):
            pipe.execute()  # on an outage, the sends stay unsent and the acks pending: redone
        self.off_loop.send()
        self.off_loop.keep_up(time.monotonic())
        self.results.acked()
        self.publication.written(published)
        now = time.time()
        for run, records, job in jobs:
            for record in records:
                run.mark_sent(record, now, job)
        self._ask_ahead()
        return sum(len(records) for _run, records, _job in jobs)

    @staticmethod
    def _may_go_on(
        run: StudyRun, sending: list[tuple[StudyRun, InFlight, bytes]], started: float
    ) -> bool:
        """Whether the turn fills another slot of `run`: while its sampling is within
        `ASK_BUDGET_S`, and past it for a trial asked ahead (sent without sampling), or to end
        the batch begun (a trial left over would go in a job of its own)."""
        if not sending or time.perf_counter() - started <= ASK_BUDGET_S:
            return True
        if run.next_asked_ahead() is not None:
            return True
        begun = sum(1 for each, _record, _payload in sending if each is run)
        return begun % run.spec.batch != 0

    def _enqueue_all(
        self, sending: list[tuple[StudyRun, InFlight, bytes]], pipe: Any
    ) -> list[tuple[StudyRun, list[InFlight], str]]:
        """Put the turn's trials in `pipe`, as jobs of up to each run's `batch` trials, in the
        order they were asked; the jobs, each with the trials it carries."""
        by_run: dict[str, tuple[StudyRun, list[tuple[InFlight, bytes]]]] = {}
        for run, record, payload in sending:
            by_run.setdefault(run.name, (run, []))[1].append((record, payload))
        jobs: list[tuple[StudyRun, list[InFlight], str]] = []
        for run, trials in by_run.values():
            if self.boundary.faulted(run.name):
                continue  # its trials end with it (`cancel`)
            size = run.spec.batch
            with self.boundary.guard(run.name, Site.SEND):
                for start in range(0, len(trials), size):
                    records = [record for record, _payload in trials[start : start + size]]
                    payloads = [payload for _record, payload in trials[start : start + size]]
                    jobs.append((run, records, self.sender.enqueue(run, records, payloads, pipe)))
        return jobs

    def _note_sent(self, jobs: list[tuple[StudyRun, list[InFlight], str]]) -> None:
        """Publish the trials about to be sent, RUNNING, in the write that sends them."""
        for run, records, _job in jobs:
            with self.boundary.guard(run.name, Site.SEND):
                for record in records:
                    self.publication.note(run.study, record.trial)

    def _refill_one(self, run: StudyRun, sending: list[tuple[StudyRun, InFlight, bytes]]) -> None:
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
            sending.append((run, record, payload))

    def due(self, run: StudyRun) -> bool:
        """Whether a turn fills `run`'s free slots now (`can_fill`, and a batch is due)."""
        return self.can_fill(run) and run.batch_due

    def can_fill(self, run: StudyRun) -> bool:
        return (
            run.wants_trial and not self.off_loop.busy(run) and not self.boundary.faulted(run.name)
        )

    def _take_sampled(self, sending: list[tuple[StudyRun, InFlight, bytes]]) -> None:
        """Create the trials the sampler process sampled, to be sent with the turn's; ask on
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
                        relative=answer.relative,
                    )
                    self.observer.asked(run.name, answer.sample_s)
                record = run.track(trial, attempt=1, phase=Phase.UNSENT)
                payload = self._seal(run, record)  # the params are set: `process()` reads them
            if payload is not None:
                sending.append((run, record, payload))

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
                job = self.sender.enqueue(run, [record], [payload], None)
                run.mark_sent(record, time.time(), job)
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
                jobs = self.sender.jobs_of(run, unsent)
                for record, job in zip(unsent, jobs, strict=True):
                    if job is not None:  # enqueued before the restart or the outage
                        run.mark_sent(record, None, job)
                for record in [r for r, job in zip(unsent, jobs, strict=True) if job is None]:
                    if run.n_outstanding > run.limit:
                        run.set_aside(record)
                    elif not self.boundary.faulted(run.name):
                        log.info("study %r: enqueueing trial %d again", run.name, record.number)
                        self.send(run, record)
