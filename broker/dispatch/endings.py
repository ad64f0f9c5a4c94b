"""How a study's trials in flight end all at once: wound down (no new trials, the running ones
finish), cancelled, abandoned (its storage failed), or failed (a broker that cannot go on).

Each trial ends through the dispatcher's `finish`, the one way a trial it holds ends, so that it
is counted once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from optuna.trial import TrialState

from optuna_rq.dispatch.boundary import FaultBoundary, Site, passes_through
from optuna_rq.dispatch.observer import DispatchObserver
from optuna_rq.dispatch.offloop import OffLoopSampling
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.dispatch.results import ResultStream
from optuna_rq.dispatch.runs import InFlight, Phase, StudyRun
from optuna_rq.dispatch.sending import TrialSender
from optuna_rq.protocol import FailReason
from optuna_rq.study.verdict import Verdict, fail_orphans, worker_lost

__all__ = ["RunEndings"]

log = logging.getLogger("optuna_rq.dispatch")

_CANCELLED = Verdict(
    state=TrialState.FAIL,
    fail_reason=FailReason.CANCELLED,
    error="the study was cancelled before this trial ended",
)


class RunEndings:
    """Ends the trials in flight of the runs in `runs` (the dispatcher's own mapping), through
    the dispatcher's collaborators."""

    def __init__(
        self,
        runs: dict[str, StudyRun],
        *,
        boundary: FaultBoundary,
        sender: TrialSender,
        results: ResultStream,
        publication: TrialPublication,
        off_loop: OffLoopSampling,
        observer: DispatchObserver,
        finish: Callable[[StudyRun, InFlight, Verdict], None],
        forget_attempt: Callable[[StudyRun, InFlight], None],
    ) -> None:
        self.runs = runs
        self.boundary = boundary
        self.sender = sender
        self.results = results
        self.publication = publication
        self.off_loop = off_loop
        self.observer = observer
        self.finish = finish
        self.forget_attempt = forget_attempt  # its lease is no longer watched (`retries`)

    def wind_down(self, run: StudyRun, why: str) -> None:
        """No new trials for `run`: the trials running on workers finish and are recorded, as
        `study.optimize` lets them after `study.stop()`; those asked ahead, never sent, end
        FAIL (`cancelled`, with `why`)."""
        self.off_loop.forget(run)
        run.budget.wind_down()
        for record in list(run.in_phase(Phase.ASKED_AHEAD)):
            verdict = Verdict(state=TrialState.FAIL, fail_reason=FailReason.CANCELLED, error=why)
            self.finish(run, record, verdict)

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
                self.finish(run, record, verdict)
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
        (`study.verdict.fail_orphans`), counted as every trial that ends."""
        ended = fail_orphans(run.study, verdict)
        if ended:
            self.observer.ended(run.name, TrialState.FAIL.name, verdict.fail_reason, count=ended)

    def abandon(self, run: StudyRun) -> None:
        """Stop dispatching `run` without a word to its storage (which failed): its queued jobs
        are withdrawn, and results that still arrive from its running trials are dropped as
        stale. Results read and not yet acknowledged are read again, so that the other
        studies' are recorded even if the failure cut a batch short."""
        self.runs.pop(run.name, None)
        self.off_loop.drop(run)
        self.publication.forget(run.name)  # recorded, maybe not durable: not to be published
        try:
            self.sender.withdraw(run, list(run.in_phase(Phase.UNSENT, Phase.SENT)))
        except Exception as exc:
            if passes_through(exc):
                raise
            # Their jobs then run and report, and the results are dropped as stale.
            log.error("study %r: its queued trials were not withdrawn: %s", run.name, exc)
        for record in run.in_flight():
            if record.holds_slot:
                self.forget_attempt(run, record)
        self.results.after_outage()

    def fail_outstanding(self, error: str) -> None:
        """End every trial in flight FAIL (`worker_lost`) without a word to Redis: for a broker
        that cannot go on, so that no trial is left RUNNING."""
        for run in self.runs.values():
            for record in run.in_flight():
                self.finish(run, record, worker_lost(error))
