"""One study being run on workers (`StudyRun`), and one record per trial it has in flight.

A trial in flight is in one phase: asked ahead (sampled and RUNNING in the storage, holding no
slot), unsent (holding a slot, its job not known to be enqueued: just asked, or found after a
restart or an outage), or sent (its job enqueued). It leaves the run when it is recorded.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import optuna
from optuna.trial import TrialState

from optuna_rq.dispatch.budget import Budget
from optuna_rq.dispatch.run_spec import RunSpec
from optuna_rq.protocol import (
    AttemptId,
    FailReason,
    error_headline,
    parse_objective_path,
)
from optuna_rq.study.optuna_trials import live_trial
from optuna_rq.study.verdict import Verdict, tell, worker_lost

__all__ = [
    "ATTEMPT_ATTR",
    "DEFINITION_ERRORS",
    "RETRY_OF_ATTR",
    "FromWorker",
    "InFlight",
    "Phase",
    "StudyRun",
]

RETRY_OF_ATTR = "retry_of"
"""User attribute of a retry: the number of the trial whose lost attempt it runs again."""
ATTEMPT_ATTR = "attempt"
"""User attribute of a retry: which attempt at those params it is (the first is 1, unmarked)."""
DEFINITION_ERRORS: Mapping[FailReason, int] = {
    # The objective does not import on the worker, or the worker may not serve it: three in a
    # row, so that one worker's broken environment among good ones does not end the study.
    FailReason.IMPORT_ERROR: 3,
    FailReason.NOT_ALLOWED: 3,
    # Its parameters do not take the space's inputs: the same for every trial, so the first.
    FailReason.BAD_SIGNATURE: 1,
}
"""Definition errors: fail reasons that say the objective never ran because of how the study is
defined, so no trial of it can run until the definition (or a worker) is fixed. Each with the
trials in a row failing for it after which the study stops failed, rather than spend its budget
on them."""


class Phase(enum.Enum):
    ASKED_AHEAD = "asked ahead"  # sampled while the workers run; holds no slot
    UNSENT = "unsent"  # holds a slot; its job is not known to be enqueued
    SENT = "sent"  # holds a slot; its job is enqueued


@dataclass(slots=True, kw_only=True)
class InFlight:
    """One trial of a run, asked and not yet recorded."""

    number: int
    attempt: int  # 1, or which retry of lost attempts at the same params
    trial: optuna.Trial = field(repr=False)
    phase: Phase
    enqueued_at: float | None = field(default=None, repr=False)  # epoch seconds, once sent
    job: str | None = None  # the RQ job carrying it, once sent (a batch's may carry others)
    payload: bytes | None = field(default=None, repr=False)  # asked ahead: its sealed request

    @property
    def holds_slot(self) -> bool:
        return self.phase is not Phase.ASKED_AHEAD


class FromWorker(Protocol):
    """What a worker's message (a `TrialResult`, a `TrialCall`) says it is for."""

    @property
    def incarnation(self) -> str: ...
    @property
    def trial_number(self) -> int: ...
    @property
    def attempt(self) -> int: ...


@dataclass(kw_only=True)
class StudyRun:
    """One study being run on workers, and the trials it has in flight.

    Every phase change goes through `track`, `occupy`, `set_aside`, `mark_sent` and `finish`,
    which keep the per-phase counts. Trials asked ahead leave in the order they were set aside.
    No module but this one assigns its fields (tests/test_run_state_owner.py): the others use
    its operations, and those of its `budget`.
    """

    study: optuna.Study
    spec: RunSpec
    budget: Budget
    journal: str | None = None  # the journal file its storage writes, if one (`offloop`)
    slots: int | None = None  # the fair share the daemon grants; None: the cap alone
    waiting_for_workers: bool = False  # no live worker listens to its queue (the daemon's view)
    peak_outstanding: int = 0
    cannot_run: str | None = None  # a definition error (see `note`): the study must stop
    _sampling: int = field(default=0, init=False, repr=False)
    _definition_streak: int = field(default=0, init=False, repr=False)
    _in_flight: dict[int, InFlight] = field(default_factory=dict, init=False, repr=False)
    _counts: Counter[Phase] = field(default_factory=Counter, init=False, repr=False)

    # -- what the daemon, fair share and the sampler process change -------------------------

    def change(self, spec: RunSpec, n_trials: int) -> None:
        """The study's spec changed: its view is replaced, and its budget is `n_trials`."""
        self.spec = spec
        self.budget.resize(n_trials)

    def grant(self, slots: int | None) -> None:
        """Its fair share of the workers (None: its cap alone)."""
        self.slots = slots

    def note_workers(self, waiting: bool) -> bool:
        """Whether no live worker listens to its queue; returns whether that changed."""
        changed = waiting != self.waiting_for_workers
        self.waiting_for_workers = waiting
        return changed

    @property
    def sampling(self) -> int:
        """Trials requested of the sampler process and not back yet: each holds a slot and
        counts against the budget."""
        return self._sampling

    def request_samples(self, n: int) -> None:
        """`n` trials were requested of the sampler process."""
        self._sampling += n
        self.budget.spend(n)

    def sample_returned(self, *, failed: bool) -> None:
        """One trial requested came back: sampled (the loop creates it), or `failed` (the loop
        asks it, spending the budget then)."""
        self._sampling -= 1
        if failed:
            self.budget.refund()

    def drop_samples(self, n: int) -> None:
        """`n` trials requested will never come back: unspent."""
        self._sampling -= n
        self.budget.refund(n)

    @property
    def name(self) -> str:
        return self.study.study_name

    @property
    def module(self) -> str:
        """The module its objective is defined in: with `queue`, it names the RQ queue."""
        return parse_objective_path(self.spec.objective)[0]

    # -- what the loop, the daemon and the metrics read ---------------------------------------

    @property
    def n_outstanding(self) -> int:
        """Trials holding a slot: sent to workers (or about to be) and not yet recorded."""
        return self._counts[Phase.UNSENT] + self._counts[Phase.SENT]

    def count(self, phase: Phase) -> int:
        return self._counts[phase]

    @property
    def outstanding(self) -> dict[int, int]:
        """A copy: trial number -> attempt, for the trials holding a slot."""
        return {r.number: r.attempt for r in self._in_flight.values() if r.holds_slot}

    @property
    def done(self) -> bool:
        return self.budget.left <= 0 and not self._in_flight and not self._sampling

    @property
    def free_slots(self) -> int:
        """Slots a new trial could take now (the budget allowing)."""
        held = self.n_outstanding + self._sampling
        return max(0, min(self.limit - held, self.budget.left))

    @property
    def wants_trial(self) -> bool:
        """Whether a slot is free and a trial can fill it (one asked ahead, or budget left)."""
        return self.n_outstanding + self._sampling < self.limit and (
            self._counts[Phase.ASKED_AHEAD] > 0 or self.budget.left > 0
        )

    @property
    def batch_due(self) -> bool:
        """Whether it may start filling its free slots: at once, or, sending its trials in
        batches (`RunSpec.batch`), once a whole batch's worth of slots is free (or every trial
        it has left fits). Slots free one at a time as trials end: filled as they free, each
        would send a job of one trial."""
        batch = self.spec.batch
        if batch == 1:
            return True
        room = self.limit - self.n_outstanding - self._sampling
        left = self.budget.left + self._counts[Phase.ASKED_AHEAD]
        return room >= min(batch, self.limit, left)

    @property
    def limit(self) -> int:
        """How many trials may be outstanding now: the cap, or less under fair share."""
        cap = self.spec.concurrency
        return cap if self.slots is None else min(cap, self.slots)

    @property
    def demand(self) -> int:
        """Slots this study could use now: its cap, or fewer near the end of its budget."""
        left = self.budget.left + len(self._in_flight) + self._sampling
        return min(self.spec.concurrency, left)

    def get(self, number: int) -> InFlight | None:
        return self._in_flight.get(number)

    def owned(self, number: int, attempt: int) -> InFlight | None:
        """The record of trial `number` if this attempt at it holds a slot here (else a result
        or call for it is stale: the trial ended, was retried, or another broker owns it)."""
        record = self._in_flight.get(number)
        if record is None or not record.holds_slot or record.attempt != attempt:
            return None
        return record

    def answers(self, message: FromWorker) -> InFlight | None:
        """The record `message` is for, if it names this incarnation and an attempt that holds
        a slot here (else it is stale, or another study's of the same name)."""
        if message.incarnation != self.spec.incarnation:
            return None
        return self.owned(message.trial_number, message.attempt)

    def attempt_id(self, record: InFlight, reply_to: str) -> AttemptId:
        """The attempt `record` runs, reporting to `reply_to`, as `Keys` names it."""
        return AttemptId(
            reply_to=reply_to,
            study=self.name,
            incarnation=self.spec.incarnation,
            trial_number=record.number,
            attempt=record.attempt,
        )

    def in_phase(self, *phases: Phase) -> Iterator[InFlight]:
        """The records in these phases, oldest first (a list may be taken while changing them)."""
        return (r for r in list(self._in_flight.values()) if r.phase in phases)

    def in_flight(self) -> list[InFlight]:
        """Every trial in flight: those holding a slot first, then those asked ahead."""
        return [
            *self.in_phase(Phase.UNSENT, Phase.SENT),
            *self.in_phase(Phase.ASKED_AHEAD),
        ]

    def next_asked_ahead(self) -> InFlight | None:
        """The trial asked ahead first: the one to send next."""
        if not self._counts[Phase.ASKED_AHEAD]:  # the refill asks this for every trial it sends
            return None
        return next(self.in_phase(Phase.ASKED_AHEAD), None)

    # -- phase changes -------------------------------------------------------------------------

    def track(self, trial: optuna.Trial, *, attempt: int, phase: Phase) -> InFlight:
        record = InFlight(number=trial.number, attempt=attempt, trial=trial, phase=phase)
        self._in_flight[trial.number] = record
        self._counts[phase] += 1
        if record.holds_slot:
            self.peak_outstanding = max(self.peak_outstanding, self.n_outstanding)
        return record

    def occupy(self, record: InFlight) -> bytes | None:
        """An asked-ahead trial takes a slot, unsent until its enqueue is known to be done;
        returns its sealed request, if it was built when asked."""
        payload, record.payload = record.payload, None
        self._move(record, Phase.UNSENT)
        self.peak_outstanding = max(self.peak_outstanding, self.n_outstanding)
        return payload

    def set_aside(self, record: InFlight) -> None:
        """An unsent trial beyond the cap gives its slot back and waits, asked ahead."""
        self._move(record, Phase.ASKED_AHEAD)

    def mark_sent(self, record: InFlight, at: float | None, job: str) -> None:
        """The trial's job `job` is enqueued (at `at`, epoch seconds; None: before a restart)."""
        self._counts[record.phase] -= 1
        record.phase = Phase.SENT
        record.job = job
        self._counts[Phase.SENT] += 1
        if at is not None:
            record.enqueued_at = at

    def finish(self, number: int) -> InFlight | None:
        """Trial `number` was recorded: it leaves the run."""
        record = self._in_flight.pop(number, None)
        if record is not None:
            self._counts[record.phase] -= 1
        self.budget.count_reported()
        return record

    def note(self, verdict: Verdict) -> None:
        """Count a recorded verdict: as many in a row as `DEFINITION_ERRORS` gives its reason that
        say the study's definition cannot run (the objective does not import, no worker may
        serve it, it does not take the space's inputs) set `cannot_run`; any other resets the
        count."""
        reason = verdict.fail_reason
        if reason is None or reason not in DEFINITION_ERRORS:
            self._definition_streak = 0
            return
        self._definition_streak += 1
        if self._definition_streak >= DEFINITION_ERRORS[reason] and self.cannot_run is None:
            streak = self._definition_streak
            trials = "a trial" if streak == 1 else f"{streak} trials in a row"
            self.cannot_run = (
                f"{reason.value}: {trials} could not run {self.spec.objective}: "
                f"{error_headline(verdict.error)}"
            )

    def _move(self, record: InFlight, phase: Phase) -> None:
        # Crossing between holding a slot and not re-inserts the record: each side keeps the
        # order trials joined it (asked ahead: sent oldest first).
        self._counts[record.phase] -= 1
        del self._in_flight[record.number]
        record.phase = phase
        self._in_flight[record.number] = record
        self._counts[phase] += 1

    # -- taking over a study -------------------------------------------------------------------

    def reattach(self) -> int:
        """Take over a study that already has trials: the ones that are not retries count
        against the budget; RUNNING ones are outstanding, unsent (their results may still
        arrive, or already have; the dispatcher enqueues the ones a stopped broker never
        enqueued).

        A RUNNING trial that a retry already runs again (the last broker stopped between
        starting the retry and failing it) is failed now, as that broker would have; returns
        how many were.
        """
        trials = self.study.get_trials(deepcopy=False)
        retried = {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}
        asked = [t for t in trials if t.state is not TrialState.WAITING]
        self.budget.restore(sum(1 for t in asked if RETRY_OF_ATTR not in t.user_attrs))
        self._in_flight.clear()
        self._counts.clear()
        lost = 0
        for frozen in trials:
            if frozen.state is not TrialState.RUNNING:
                continue
            if frozen.number in retried:
                error = "its worker was lost; the trial that retries it had already started"
                tell(self.study, frozen.number, worker_lost(error))
                lost += 1
                continue
            attempt = int(frozen.user_attrs.get(ATTEMPT_ATTR, 1))
            record = InFlight(
                number=frozen.number,
                attempt=attempt,
                trial=live_trial(self.study, frozen),
                phase=Phase.UNSENT,
            )
            self._in_flight[frozen.number] = record
            self._counts[Phase.UNSENT] += 1
        return lost
