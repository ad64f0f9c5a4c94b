"""The status publisher: what `optuna-rq status`, `wait` and BrokerClient read of each study.

A study's StudyStatus (its spec, its state, its trials by outcome and failures by reason, its best
trial or Pareto front) is written to `Keys.status` when the study starts, ends or changes, and
while it runs, at most every `interval_s` seconds and only once a trial of it was sent or reported.

Reading a study's trials for its status walks every trial, which grows costly with the study:
while it runs, the interval grows so that publishing takes at most `MAX_SHARE` of the broker's time
(a study's start and end are written at once, whatever the interval).

Every state it writes is a move its `Lifecycle` allows; it refuses the others, so an ended study
is never rewritten. Counts are of the budget: a lost trial and its retries are one unit. What a
status says is durable first (`persist`): a restarted broker never shows less than its status did.

Summarising a running study is a site of its fault boundary: a study whose summary raises fails
alone. Its failed status then carries the figures last read of it, never zeros.

Each status is sealed by the broker's signer (`StudyStatus.sealed`), so that with signing on the
front doors believe only what the broker wrote. The study's trials recorded since they were last
published (`dispatch.publication`) are published in the same write.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import optuna
import redis

from optuna_rq.daemon.lifecycle import Lifecycle
from optuna_rq.dispatch import StudyRun, count_refusal
from optuna_rq.dispatch.boundary import FaultBoundary, Site, passes_through
from optuna_rq.dispatch.publication import TrialPublication
from optuna_rq.dispatch.summary import study_summary
from optuna_rq.errors import ProtocolError, StudyStorageError
from optuna_rq.protocol import Keys, Signer, StudySpec, StudyState, StudyStatus
from optuna_rq.protocol.status import read_status

__all__ = ["MAX_SHARE", "StatusPublisher"]

MAX_SHARE = 0.05
"""At most this share of the broker's time goes to publishing running studies' statuses."""

_STOPPABLE = (StudyState.RUNNING, StudyState.FINISHED)
"""The states whose status says why a stop condition stopped the study: a cancelled or failed
one ended for another reason."""


class StatusPublisher:
    """Writes StudyStatus for the broker, sealed by `signer`. `storage_url` names the storage a
    spec's trials are in (its own, or the broker's default)."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        *,
        interval_s: float,
        storage_url: Callable[[StudySpec], str],
        boundary: FaultBoundary,
        signer: Signer,
        persist: Callable[[], None] | None = None,
        stopped: Callable[[str], str | None] | None = None,
        trials: TrialPublication | None = None,
    ) -> None:
        self.connection = connection
        self.stopped = stopped or (lambda _name: None)
        """Why a study stopped before its budget (`StopConditions.reason`): stated in its status
        while it runs on to its last trials and once it finished."""
        self.signer = signer
        self.trials = trials  # the study's trials noted and not yet published go with its status
        self.boundary = boundary
        self.persist = persist
        self.keys = keys
        self.interval_s = interval_s
        self.storage_url = storage_url
        self.lifecycle = Lifecycle()
        self._dirty: set[str] = set()
        self._last_publish = 0.0
        self._interval_s = interval_s  # grown by what the last publishing took
        self._summaries: dict[str, dict[str, Any]] = {}  # the last read of each running study

    def mark(self, *names: str) -> None:
        """Note that these running studies changed: the next due `publish_running` writes them."""
        self._dirty.update(names)

    def publish_running(
        self,
        runs: Mapping[str, StudyRun],
        specs: Mapping[str, StudySpec],
        *,
        force: bool = False,
    ) -> None:
        """Publish the marked studies still in `runs` as RUNNING, if `interval_s` (or longer,
        after a publishing that took long: `MAX_SHARE`) has passed since the last time (or
        `force`); then none is marked."""
        now = time.monotonic()
        if not force and now - self._last_publish < self._interval_s:
            return
        self._last_publish = now
        for name in list(self._dirty):
            run = runs.get(name)
            if run is not None and not self.boundary.faulted(name):
                with self.boundary.guard(name, Site.STATUS):
                    self.publish(specs[name], run, state=StudyState.RUNNING)
        self._dirty.clear()
        took = time.monotonic() - now
        self._interval_s = max(self.interval_s, took / MAX_SHARE)

    def publish(
        self,
        spec: StudySpec,
        run: StudyRun | None,
        *,
        state: StudyState,
        error: str | None = None,
        flush: bool = True,
    ) -> None:
        """Write the study's status now: from its spec, and from its `run` if it has one, once
        the storages' changes are durable (unless not `flush`: a status that acknowledges
        nothing, as a failed storage's). StudyConflictError, writing nothing, if the study may
        not move to `state`."""
        self.lifecycle.check(spec.name, state)
        summary = self._summary(spec.name, None if run is None else run.study, run, state=state)
        self._write(spec, run, state=state, error=error, flush=flush, summary=summary)

    def publish_failed(
        self,
        spec: StudySpec,
        run: StudyRun | None,
        *,
        error: str,
        flush: bool = True,
        held: optuna.Study | None = None,
    ) -> None:
        """Write the study's status FAILED, with `error`. Its figures are those of `held` (the
        study as its storage holds it, read back after the storage failed: not what was recorded
        and never written) if given, else read from its `run` if they can be, else they are the
        last ones read: the failure may be in reading them."""
        self.lifecycle.check(spec.name, StudyState.FAILED)
        study = held if held is not None else None if run is None else run.study
        try:
            summary = self._summary(spec.name, study, run, state=StudyState.FAILED)
        except Exception as exc:
            if passes_through(exc) and not isinstance(exc, StudyStorageError):
                raise
            summary = {**self._summaries.pop(spec.name, {}), "running": 0}
        self._write(spec, run, state=StudyState.FAILED, error=error, flush=flush, summary=summary)

    def _summary(
        self,
        name: str,
        study: optuna.Study | None,
        run: StudyRun | None,
        *,
        state: StudyState,
    ) -> dict[str, Any]:
        if study is None:
            return self._summaries.pop(name, {}) if state.ended else {}
        running = 0 if run is None or state.ended else len(run.outstanding)
        summary = {**study_summary(study), "running": running}
        if state.ended:
            self._summaries.pop(name, None)
        else:
            self._summaries[name] = summary
        return summary

    def _write(
        self,
        spec: StudySpec,
        run: StudyRun | None,
        *,
        state: StudyState,
        error: str | None,
        flush: bool,
        summary: dict[str, Any],
    ) -> None:
        self.lifecycle.move(spec.name, state)
        if flush and self.persist is not None:
            self.persist()
        status = StudyStatus.of(
            spec,
            state=state,
            storage=self.storage_url(spec),
            error=error,
            stopped=self.stopped(spec.name) if state in _STOPPABLE else None,
            # An ended study waits for nothing, even if its last trials ran before the fair
            # share's next look at the pools noticed the worker that ran them.
            waiting_for_workers=run is not None and run.waiting_for_workers and not state.ended,
            **summary,
        )
        pipe = self.connection.pipeline(transaction=False)
        # Its trials as recorded (a cancel's, the last ones of a study that ends) are published
        # with the status that counts them; not a failed storage's: they may not be durable.
        published = self.trials.into(pipe, [spec.name]) if self.trials is not None and flush else {}
        pipe.hset(self.keys.status, spec.name, status.sealed(self.signer))
        pipe.execute()
        if self.trials is not None:
            self.trials.written(published)

    def annotate(self, spec: StudySpec, error: str) -> None:
        """Say on an ended study's status that its resubmission `spec` was refused, changing
        nothing else: a `submit --wait` following it learns why, instead of waiting on. A status
        that is not the broker's (refused, counted) is left as it is: there is nothing to keep."""
        try:
            status = read_status(self.connection, self.keys, self.signer, spec.name)
        except ProtocolError as exc:
            why = f"not annotating it, for study {spec.name!r}: {exc}"
            count_refusal(self.connection, self.keys.prefix, "status", why)
            return
        if status is None:
            return
        status = status.with_changes(error=error, submitted_at=spec.submitted_at)
        self.connection.hset(self.keys.status, spec.name, status.sealed(self.signer))
