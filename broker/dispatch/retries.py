"""Lost attempts and their retries.

An attempt whose worker is lost (its lease lapsed: see `leases`, or its worker's supervisor
reported it `worker_lost`) is told FAIL and, under the study's retry policy, its params run again
as a new trial that records which one it retries (`retry_of`) and which attempt it is. Retries do
not eat the budget until they run out: `n_trials` counts trials that are not retries, so the
budget is exact across broker restarts too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING

import optuna
import redis
from optuna.trial import TrialState

from optuna_rq.dispatch.leases import LeaseWatch, Watched
from optuna_rq.protocol import FailReason, Keys
from optuna_rq.trials import create_running_trial, frozen_trial
from optuna_rq.verdict import Verdict

if TYPE_CHECKING:
    from optuna_rq.dispatch.runs import InFlight, StudyRun

__all__ = ["ATTEMPT_ATTR", "RETRY_OF_ATTR", "LeaseCheck", "lost_verdict", "plan_retry"]

log = logging.getLogger("optuna_rq.dispatch")

RETRY_OF_ATTR = "retry_of"
"""User attribute of a retry: the number of the trial whose lost attempt it runs again."""
ATTEMPT_ATTR = "attempt"
"""User attribute of a retry: which attempt at those params it is (the first is 1, unmarked)."""


def lost_verdict(error: str) -> Verdict:
    return Verdict(state=TrialState.FAIL, fail_reason=FailReason.WORKER_LOST, error=error)


def plan_retry(run: StudyRun, record: InFlight, why: str) -> tuple[Verdict, optuna.Trial | None]:
    """How the lost attempt `record` ends, and the retry that runs its params again (None: the
    retries ran out). The retry exists before the lost trial is told: a broker that stops in
    between finds both, and `StudyRun.reattach` completes the step."""
    number, attempt = record.number, record.attempt
    if attempt > run.max_retries:
        error = f"{why}; not retried: {attempt} attempts, max retries {run.max_retries}"
        log.warning("study %r trial %d failed: %s", run.name, number, error)
        return lost_verdict(error), None
    retry = _create_retry(run, record, attempt + 1)
    error = f"{why}; retried as trial {retry.number}"
    log.warning("study %r trial %d: %s", run.name, number, error)
    return lost_verdict(error), retry


def _create_retry(run: StudyRun, record: InFlight, attempt: int) -> optuna.Trial:
    lost = frozen_trial(run.study, record.trial)
    return create_running_trial(
        run.study,
        params=lost.params,
        distributions=lost.distributions,
        user_attrs={RETRY_OF_ATTR: record.number, ATTEMPT_ATTR: attempt},
    )


class LeaseCheck:
    """Which sent attempts have lost their worker, looked at every `check_s` at most."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        keys: Keys,
        reply_to: str,
        intermediate_key: str,
        grace_s: float,
        check_s: float,
    ) -> None:
        self.keys = keys
        self.reply_to = reply_to
        self.watch = LeaseWatch(connection, intermediate_key=intermediate_key, grace_s=grace_s)
        self.check_s = check_s
        self._next_check = 0.0

    def due(self) -> bool:
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.check_s
        return True

    def lost(
        self, sent: Iterable[tuple[StudyRun, InFlight]]
    ) -> list[tuple[StudyRun, InFlight, str]]:
        """The attempts among `sent` that look lost now, each with why. The caller reads the
        result stream before failing them: one whose result just came in is told, not lost."""
        watched = {self.keys.job_id(run.name, r.number, r.attempt): (run, r) for run, r in sent}
        lost = self.watch.check(Watched(j, Keys.lease(self.reply_to, j)) for j in watched)
        return [(*watched[item.job_id], why) for item, why in lost]

    def forget(self, run: StudyRun, record: InFlight) -> None:
        self.watch.forget(self.keys.job_id(run.name, record.number, record.attempt))

    def reset(self) -> None:
        """After a Redis outage: every lease gets its grace again before it counts as lost."""
        self.watch.reset()
