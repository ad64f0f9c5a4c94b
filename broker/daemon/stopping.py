"""Stop conditions: a study submitted with `--timeout`, `--target` or `--patience` ends FINISHED
before its budget when one holds, a success, and its status names it (`StudyStatus.stopped`,
never `error`) from the moment it holds.

When one holds, no new trial starts; trials already running on workers finish and are recorded, as
`study.optimize(timeout=...)` lets its running trial finish; a trial sampled ahead and not yet
sent (`--ask-ahead`) ends FAIL (`cancelled`). The wall clock counts from the submission
(`StudySpec.submitted_at`), so a broker restart does not reset it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

from optuna_rq.dispatch.runs import Phase, StudyRun
from optuna_rq.protocol import StudySpec

__all__ = ["StopConditions", "stop_reason"]

log = logging.getLogger("optuna_rq.broker")


def stop_reason(spec: StudySpec, study: optuna.Study, *, now_s: float | None = None) -> str | None:
    """Which stop condition of `spec` holds for `study` now, stated for the study's status; None
    if none does (or it has none)."""
    if spec.timeout_s is not None:
        elapsed = (time.time() if now_s is None else now_s) - spec.submitted_at
        if elapsed >= spec.timeout_s:
            return f"stopped by --timeout {spec.timeout_s:g}: {elapsed:.0f}s since it was submitted"
    if spec.target is None and spec.patience is None:
        return None
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not complete:
        return None
    maximize = study.direction is StudyDirection.MAXIMIZE
    best = (max if maximize else min)(complete, key=lambda t: t.value)  # type: ignore[arg-type,return-value]
    assert best.value is not None
    if spec.target is not None and (
        best.value >= spec.target if maximize else best.value <= spec.target
    ):
        return f"stopped by --target {spec.target:g}: trial {best.number} reached {best.value:g}"
    if spec.patience is not None:
        since = sum(1 for t in complete if t.number > best.number)
        if since >= spec.patience:
            return (
                f"stopped by --patience {spec.patience}: no improvement in {since} completed "
                f"trials since trial {best.number} ({best.value:g})"
            )
    return None


class StopConditions:
    """The daemon's watch over its studies' stop conditions."""

    def __init__(self) -> None:
        self._reasons: dict[str, str] = {}
        self._due: set[str] = set()

    def watch(self, name: str) -> None:
        """A study (re)started: check it at the next turn, before any result is recorded. A reason
        held for an earlier run of it (resubmitted while its last trials finished) is dropped:
        the resubmission reopens it, its clock counting from the new submission."""
        self._reasons.pop(name, None)
        self._due.add(name)

    def check(
        self,
        runs: Mapping[str, StudyRun],
        specs: Mapping[str, StudySpec],
        *,
        told: bool,
        wind_down: Callable[[StudyRun, str], None],
        guard: Callable[[str], AbstractContextManager[None]],
    ) -> list[str]:
        """Wind down each run whose condition holds; the studies whose condition held this time
        (their status has news). Best value and patience change only when a trial is recorded; the
        clock is read every turn. Each study's check runs under `guard` (its fault guard)."""
        for name in [name for name in self._reasons if name not in runs]:
            del self._reasons[name]  # it ended (its FINISHED status stated why), or was cancelled
        stopped = []
        for name, run in runs.items():
            with guard(name):
                if self._check(name, run, specs, told=told, wind_down=wind_down):
                    stopped.append(name)
        return stopped

    def _check(
        self,
        name: str,
        run: StudyRun,
        specs: Mapping[str, StudySpec],
        *,
        told: bool,
        wind_down: Callable[[StudyRun, str], None],
    ) -> bool:
        """Check one run; True if its condition held for the first time."""
        spec = specs.get(name)
        if spec is None or (spec.timeout_s, spec.target, spec.patience) == (None,) * 3:
            return False
        reason = self._reasons.get(name)
        if reason is None and (told or name in self._due or spec.timeout_s is not None):
            reason = stop_reason(spec, run.study)
        self._due.discard(name)
        if reason is None:
            return False
        first = name not in self._reasons
        if first:
            log.info("study %r %s", name, reason)
            self._reasons[name] = reason
        if run.budget.left > 0 or run.count(Phase.ASKED_AHEAD):  # budget or asks left
            wind_down(run, reason)
        return first

    def reason(self, name: str) -> str | None:
        """Why the running study `name` stopped before its budget; None if nothing stopped it.
        Its statuses say so while its last trials finish and once it is finished, and `set`
        is refused meanwhile (`protocol.status.refuse_if_closed`)."""
        return self._reasons.get(name)
