"""What a study's status says of its trials: counts by outcome and failures by reason, the
budget's count, the last error, the best trial or Pareto front (the `StudyStatus` fields read
from the study). One reading for every publisher: the broker's (`daemon.status_publisher`) and a
remote Optimizer's (`optuna_rq.optimizer_run.run_status`).

Reading them walks every trial of the study, which grows costly as the study grows:
publishers bound how often they do it.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.trial import TrialState

from optuna_rq.dispatch.runs import RETRY_OF_ATTR
from optuna_rq.protocol import error_headline
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR

__all__ = ["LAST_ERROR_CHARS", "study_summary"]


def study_summary(study: optuna.Study) -> dict[str, Any]:
    """The StudyStatus fields read from the study's trials."""
    trials = study.get_trials(deepcopy=False)
    by_state = {state: 0 for state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}
    retried = {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}
    reasons: dict[str, int] = {}
    ended = 0
    last_failed: optuna.trial.FrozenTrial | None = None
    for trial in trials:
        if trial.state in by_state:
            by_state[trial.state] += 1
            ended += trial.number not in retried  # its last attempt: one unit of the budget
        if trial.state is TrialState.FAIL:
            reason = str(trial.user_attrs.get(FAIL_REASON_ATTR, "unknown"))
            reasons[reason] = reasons.get(reason, 0) + 1
            if last_failed is None or _ended_at(trial) >= _ended_at(last_failed):
                last_failed = trial
    summary: dict[str, Any] = {
        "complete": by_state[TrialState.COMPLETE],
        "pruned": by_state[TrialState.PRUNED],
        "failed": by_state[TrialState.FAIL],
        "fail_reasons": reasons,
        "ended": ended,
        "retries": sum(1 for t in trials if RETRY_OF_ATTR in t.user_attrs),
        "last_error": None if last_failed is None else _last_line(last_failed),
    }
    if not by_state[TrialState.COMPLETE]:
        return summary
    if len(study.directions) == 1:
        try:
            best = study.best_trial
        except ValueError:  # a constrained study with no feasible trial yet has no best
            return summary
        summary.update(best_value=best.value, best_params=best.params)
    else:  # the Pareto front
        summary["best_values"] = [t.values for t in study.best_trials]
        summary["best_params"] = [t.params for t in study.best_trials]
    return summary


def _ended_at(trial: optuna.trial.FrozenTrial) -> tuple[float, int]:
    ended = trial.datetime_complete
    return (0.0 if ended is None else ended.timestamp(), trial.number)


LAST_ERROR_CHARS = 300
"""A status carries at most this much of a trial's error: its last line, the exception."""


def _last_line(trial: optuna.trial.FrozenTrial) -> str | None:
    """The headline of a failed trial's error (`error_headline`), cut to `LAST_ERROR_CHARS`."""
    last = error_headline(str(trial.user_attrs.get(FAIL_ERROR_ATTR, "")))
    if not last:
        return None
    return last if len(last) <= LAST_ERROR_CHARS else last[: LAST_ERROR_CHARS - 3] + "..."
