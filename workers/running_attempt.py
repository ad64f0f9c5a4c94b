"""An attempt a worker process is running, as its supervising parent knows it: what it needs to
renew the attempt's lease, watch its deadline, read its cancel mark, and report it if its process
cannot.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from optuna_rq.protocol import AttemptId, FailReason, Keys, Outcome, TrialRequest, TrialResult
from optuna_rq.workers.execute import trial_result

__all__ = ["TIMEOUT_GRACE_S", "Attempt"]

TIMEOUT_GRACE_S = 1.0
"""How long past its timeout a trial may run before its process is killed: time for RQ's own
alarm to stop Python code, which keeps the worker process alive."""


@dataclass(frozen=True, kw_only=True)
class Attempt:
    """One attempt a worker process is running, as its supervisor knows it."""

    job_id: str
    lease: str  # the lease key
    holder: str  # the lease's value: the worker that holds it
    pid: int
    started: float  # time.monotonic(): one clock for every process on the machine
    timeout_s: float | None
    study: str
    incarnation: str
    trial_number: int
    attempt: int
    reply_to: str
    token: str = ""  # the request's: the result the supervisor writes for it gives it back

    @classmethod
    def of(
        cls, request: TrialRequest, *, job_id: str, lease: str, holder: str, timeout_s: float | None
    ) -> Attempt:
        return cls(
            job_id=job_id,
            lease=lease,
            holder=holder,
            pid=os.getpid(),
            started=time.monotonic(),
            timeout_s=timeout_s,
            study=request.study,
            incarnation=request.incarnation,
            trial_number=request.trial_number,
            attempt=request.attempt,
            reply_to=request.reply_to,
            token=request.token,
        )

    @property
    def attempt_id(self) -> AttemptId:
        return AttemptId(
            reply_to=self.reply_to,
            study=self.study,
            incarnation=self.incarnation,
            trial_number=self.trial_number,
            attempt=self.attempt,
        )

    @property
    def cancel_mark(self) -> str:
        """The key the broker sets to cancel this attempt: read only through `CancelMarks`."""
        return Keys.cancel(self.attempt_id)

    @property
    def deadline(self) -> float | None:
        return None if self.timeout_s is None else self.started + self.timeout_s + TIMEOUT_GRACE_S

    def failed(self, reason: FailReason, error: str) -> TrialResult:
        """The result of this attempt, lost or killed: its process cannot report it."""
        return trial_result(
            self, Outcome.FAIL, worker=self.holder, started=self.started, reason=reason, error=error
        )

    def describe(self) -> str:
        return f"study {self.study!r} trial {self.trial_number} (attempt {self.attempt})"
