"""How one trial ends in its study: the verdict, recorded exactly once, with the failure's reason.

Shared by the in-process Optimizer and the dispatcher (results from workers), so a trial ends the
same way wherever it ran; the return value itself is judged by the protocol's `judge_return`.
"""

from __future__ import annotations

from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from optuna_rq.protocol.messages import FailReason
from optuna_rq.protocol.objectives import MAX_ERROR_CHARS, judge_return
from optuna_rq.study.optuna_trials import (
    fail_running_trial,
    frozen_trial,
    live_trial,
    set_trial_user_attr,
)

__all__ = [
    "FAIL_ERROR_ATTR",
    "FAIL_REASON_ATTR",
    "Verdict",
    "fail_orphans",
    "judge_result",
    "tell",
    "worker_lost",
]

# A failed trial carries why, and the error text, as user attributes: they show up in
# optuna-dashboard and in `study.trials_dataframe()` without any tooling of ours.
FAIL_REASON_ATTR = "fail_reason"
FAIL_ERROR_ATTR = "fail_error"


@dataclass(frozen=True)
class Verdict:
    """How one trial ends: the values to tell, or the state and failure reason."""

    state: TrialState
    values: list[float] | None = None
    fail_reason: FailReason | None = None
    error: str | None = None


def worker_lost(error: str) -> Verdict:
    """The verdict on an attempt whose worker was lost (killed, frozen, cut off): FAIL."""
    return Verdict(state=TrialState.FAIL, fail_reason=FailReason.WORKER_LOST, error=error)


def judge_result(result: object, n_objectives: int) -> Verdict:
    """The verdict on what an in-process objective returned: COMPLETE with what `study.tell`
    takes (`judge_return`), else FAIL `bad_return` with Optuna's reason.

    NaN values are kept so `tell` passes them with `state=None` and Optuna records FAIL itself.
    """
    values, why = judge_return(result, n_objectives)
    if why is None:
        return Verdict(state=TrialState.COMPLETE, values=values)
    return Verdict(
        state=TrialState.FAIL, values=values, fail_reason=FailReason.BAD_RETURN, error=why
    )


def tell(study: optuna.Study, trial: optuna.Trial | int, verdict: Verdict) -> TrialState:
    """Tell `study` how `trial` ended, exactly once, recording the reason of a failure; the
    state it ended in (FAIL for a NaN value, which Optuna records so).

    Idempotent: a trial already finished is left alone (results may arrive twice).
    """
    if verdict.fail_reason is not None:
        _record_failure(study, trial, verdict.fail_reason, verdict.error)
    if verdict.state is TrialState.COMPLETE or verdict.values is not None:
        # state=None: Optuna records NaN as FAIL rather than raising and leaving it RUNNING.
        return study.tell(trial, verdict.values, skip_if_finished=True).state
    return study.tell(trial, state=verdict.state, skip_if_finished=True).state


def fail_orphans(study: optuna.Study, verdict: Verdict) -> int:
    """End FAIL, with `verdict`'s reason, every trial of `study` still RUNNING in its storage,
    through the storage alone (its sampler may be what broke); how many. For a study that
    faulted, once its trials in flight are recorded: an ask that raised after creating its trial
    left one that nobody holds."""
    orphans = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for frozen in orphans:
        reason = verdict.fail_reason or FailReason.CANCELLED
        set_trial_user_attr(study, frozen.number, FAIL_REASON_ATTR, reason.value)
        if verdict.error:
            set_trial_user_attr(study, frozen.number, FAIL_ERROR_ATTR, verdict.error)
        fail_running_trial(study, frozen)
    return len(orphans)


def _record_failure(
    study: optuna.Study, trial: optuna.Trial | int, reason: FailReason, error: str | None
) -> None:
    frozen = frozen_trial(study, trial)
    if frozen.state.is_finished():
        return
    live = trial if isinstance(trial, optuna.Trial) else live_trial(study, frozen)  # one lookup
    set_trial_user_attr(study, live, FAIL_REASON_ATTR, reason.value)
    if error:
        set_trial_user_attr(study, live, FAIL_ERROR_ATTR, error[-MAX_ERROR_CHARS:])
