"""How a trial ends: judging what an objective returned, and telling the study exactly once.

Shared by the in-process Optimizer, the dispatcher (results from workers) and the workers
(`judge_return`), so a trial ends the same way wherever it ran.
"""

from __future__ import annotations

import math
import traceback
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

__all__ = [
    "FAIL_ERROR_ATTR",
    "FAIL_REASON_ATTR",
    "Verdict",
    "describe_exception",
    "judge_result",
    "judge_return",
    "tell",
]

# A failed trial carries why, and the error text, as user attributes: they show up in
# optuna-dashboard and in `study.trials_dataframe()` without any tooling of ours.
FAIL_REASON_ATTR = "fail_reason"
FAIL_ERROR_ATTR = "fail_error"
MAX_ERROR_CHARS = 4000


def judge_return(result: object, n_objectives: int) -> tuple[list[float] | None, str | None]:
    """Check an objective's return: (values, None) when valid, (values or None, why) when not.

    Valid is a float (or int) for one objective, a tuple or list of them, one per direction, for
    several. NaN values come back with a reason, so the caller can record why the trial failed.
    """
    items = list(result) if isinstance(result, (tuple, list)) else [result]
    if len(items) != n_objectives or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in items
    ):
        expected = "a float" if n_objectives == 1 else f"a tuple of {n_objectives} floats"
        return None, f"objective returned {result!r} ({type(result).__name__}); expected {expected}"
    values = [float(v) for v in items]  # type: ignore[arg-type]
    if any(math.isnan(v) for v in values):
        return values, f"objective returned NaN: {result!r}"
    return values, None


@dataclass(frozen=True)
class Verdict:
    """How one trial ends: the values to tell, or the state and failure reason."""

    state: TrialState
    values: list[float] | None = None
    fail_reason: str | None = None
    error: str | None = None


def judge_result(result: object, n_objectives: int) -> Verdict:
    """The verdict on what an in-process objective returned; anything but floats is FAIL.

    NaN values are kept so `tell` passes them with `state=None` and Optuna records FAIL itself.
    """
    values, why = judge_return(result, n_objectives)
    if why is None:
        return Verdict(state=TrialState.COMPLETE, values=values)
    return Verdict(state=TrialState.FAIL, values=values, fail_reason="bad_return", error=why)


def tell(study: optuna.Study, trial: optuna.Trial | int, verdict: Verdict) -> None:
    """Tell `study` how `trial` ended, exactly once, recording the reason of a failure.

    Idempotent: a trial already finished is left alone (results may arrive twice).
    """
    if verdict.fail_reason is not None:
        _record_failure(study, trial, verdict.fail_reason, verdict.error)
    if verdict.state is TrialState.COMPLETE or verdict.values is not None:
        # state=None: Optuna records NaN as FAIL rather than raising and leaving it RUNNING.
        study.tell(trial, verdict.values, skip_if_finished=True)
    else:
        study.tell(trial, state=verdict.state, skip_if_finished=True)


def _record_failure(
    study: optuna.Study, trial: optuna.Trial | int, reason: str, error: str | None
) -> None:
    trial_id = trial._trial_id if isinstance(trial, optuna.Trial) else _trial_id(study, trial)
    storage = study._storage
    if storage.get_trial(trial_id).state.is_finished():
        return
    storage.set_trial_user_attr(trial_id, FAIL_REASON_ATTR, reason)
    if error:
        storage.set_trial_user_attr(trial_id, FAIL_ERROR_ATTR, error[-MAX_ERROR_CHARS:])


def _trial_id(study: optuna.Study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def describe_exception(exc: BaseException) -> str:
    """The error text stored on a failed trial: the exception line, then the traceback."""
    text = "".join(traceback.format_exception(exc))
    return text[-MAX_ERROR_CHARS:]
