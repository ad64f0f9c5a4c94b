"""Lost attempts and their retries.

An attempt whose worker is lost (its lease lapsed: see `leases`, or its worker's supervisor
reported it `worker_lost`) is recorded as FAIL and, under the study's retry policy, its params
run again as a new trial that records which one it retries (`retry_of`) and which attempt it is.
Retries do not eat the budget until they run out: `n_trials` counts trials that are not retries,
so the budget is exact across broker restarts too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import optuna
import redis

from optuna_rq.dispatch.boundary import FaultBoundary, Site
from optuna_rq.dispatch.leases import LeaseWatch, Watched
from optuna_rq.dispatch.runs import ATTEMPT_ATTR, RETRY_OF_ATTR, InFlight, Phase, StudyRun
from optuna_rq.protocol import Keys
from optuna_rq.study.optuna_trials import create_running_trial, frozen_trial
from optuna_rq.study.verdict import Verdict, worker_lost

__all__ = ["Retries", "plan_retry"]

log = logging.getLogger("optuna_rq.dispatch")


def plan_retry(run: StudyRun, record: InFlight, why: str) -> tuple[Verdict, optuna.Trial | None]:
    """How the lost attempt `record` ends, and the retry that runs its params again (None: the
    retries ran out). The retry exists before the lost trial is recorded: a broker that stops in
    between finds both, and `StudyRun.reattach` completes the step."""
    number, attempt = record.number, record.attempt
    if attempt > run.spec.max_retries:
        error = f"{why}; not retried: {attempt} attempts, max retries {run.spec.max_retries}"
        log.warning("study %r trial %d failed: %s", run.name, number, error)
        return worker_lost(error), None
    retry = _create_retry(run, record, attempt + 1)
    error = f"{why}; retried as trial {retry.number}"
    log.warning("study %r trial %d: %s", run.name, number, error)
    return worker_lost(error), retry


def _create_retry(run: StudyRun, record: InFlight, attempt: int) -> optuna.Trial:
    lost = frozen_trial(run.study, record.trial)
    return create_running_trial(
        run.study,
        params=lost.params,
        distributions=lost.distributions,
        user_attrs={RETRY_OF_ATTR: record.number, ATTEMPT_ATTR: attempt},
    )


class Retries:
    """Finds the sent attempts that lost their worker (by their leases, every `check_s` at
    most, or by a `worker_lost` report), fails them, and starts their retries.

    `finish` records a trial's verdict and takes it out of its run; `send` enqueues an unsent
    trial on its own; both belong to the dispatcher, whose loop this runs in.
    """

    def __init__(
        self,
        connection: redis.Redis,
        *,
        keys: Keys,
        reply_to: str,
        intermediate_key: Callable[[StudyRun], str],
        grace_s: float,
        check_s: float,
        boundary: FaultBoundary,
        finish: Callable[[StudyRun, InFlight, Verdict], None],
        send: Callable[[StudyRun, InFlight], None],
    ) -> None:
        self.keys = keys
        self.reply_to = reply_to
        self.watch = LeaseWatch(connection, intermediate_key="", grace_s=grace_s)
        self._intermediate_key = intermediate_key  # a run's queue's list of dequeued jobs
        self.check_s = check_s
        self.boundary = boundary
        self._finish = finish
        self._send = send
        self._next_check = 0.0
        self.lost_attempts = 0  # attempts whose worker was lost

    def check(self, runs: Mapping[str, StudyRun], drain: Callable[[], object]) -> int:
        """If a check is due: fail (and retry) the attempts whose leases say their worker is
        lost; how many. `drain` reads the result stream first: an attempt whose result came in
        just before its lease went is recorded, not lost."""
        now = time.monotonic()
        if now < self._next_check:
            return 0
        self._next_check = now + self.check_s
        watched: dict[str, tuple[StudyRun, InFlight, Watched]] = {}
        for run in runs.values():
            if self.boundary.faulted(run.name):
                continue
            with self.boundary.guard(run.name, Site.LEASES):
                intermediate = self._intermediate_key(run)
                for r in run.in_phase(Phase.SENT):
                    of = run.attempt_id(r, self.reply_to)
                    lease = Keys.lease(of)
                    job = r.job or Keys.job_id(of)
                    watched[lease] = (run, r, Watched(job, lease, intermediate))
        lost = self.watch.check(attempt for _run, _record, attempt in watched.values())
        if not lost:
            return 0
        drain()
        count = 0
        for item, why in lost:
            run, record, _attempt = watched[item.lease]
            if runs.get(run.name) is not run or self.boundary.faulted(run.name):
                continue
            if run.owned(record.number, record.attempt):
                with self.boundary.guard(run.name, Site.TELL):
                    self.lost(run, record, why)
                    count += 1
        return count

    def lost(self, run: StudyRun, record: InFlight, why: str) -> None:
        """The attempt `record` will never report: fail it `worker_lost`, and start its retry
        while retries last (the budget unit passes to the retry; it takes the same slot)."""
        self.lost_attempts += 1
        verdict, retry = plan_retry(run, record, why)
        self._finish(run, record, verdict)  # counted there, as every trial that ends
        if retry is not None:
            self._send(run, run.track(retry, attempt=record.attempt + 1, phase=Phase.UNSENT))

    def forget(self, run: StudyRun, record: InFlight) -> None:
        """The trial of `record` was recorded: its lease is no longer watched."""
        self.watch.forget(Keys.lease(run.attempt_id(record, self.reply_to)))

    def reset(self) -> None:
        """After a Redis outage: every lease gets its grace again before it counts as lost."""
        self.watch.reset()
