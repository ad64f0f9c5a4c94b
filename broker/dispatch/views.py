"""What a remote trial reads back: its trial and its study as the storage holds them, as maps
msgpack carries (`optuna_rq.workers.remote_study` turns them back into Optuna objects).

A trial's map has its number, state, values, params, distributions (Optuna's own JSON), user and
system attributes, intermediate values (steps as str keys: the wire takes str keys only) and
times (ISO 8601). A multi-objective study's intermediate values are the lists reported with
`report(values, step)`, kept in the user attribute `INTERMEDIATE_VALUES_ATTR`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import optuna
from optuna.distributions import distribution_to_json
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.study.optuna_trials import frozen_trial, set_trial_user_attr, study_system_attrs

__all__ = [
    "INTERMEDIATE_VALUES_ATTR",
    "relative_search_space_view",
    "report_values",
    "study_trials_view",
    "study_view",
    "trial_view",
]

INTERMEDIATE_VALUES_ATTR = "intermediate_values"
"""User attribute of a multi-objective trial: `{"<step>": [value per objective], ...}`, what its
objective reported with `trial.report(values, step)` (Optuna's own intermediate values take one
float; a user attribute shows in optuna-dashboard and `study.trials_dataframe()`)."""


def report_values(
    study: optuna.Study, trial: optuna.Trial, values: Sequence[Any], step: int
) -> str:
    """`MultiObjectiveTrial.report(values, step)`: one value per objective at `step`, kept in
    `INTERMEDIATE_VALUES_ATTR`. Returns a warning for a step already reported (ignored, as
    Optuna ignores it), else ''."""
    n = len(study.directions)
    if len(values) != n:
        raise ValueError(
            f"report(values, step) takes one value per objective: the study has {n} directions, "
            f"got {len(values)} values"
        )
    floats = [_float(v) for v in values]
    reported = dict(frozen_trial(study, trial).user_attrs.get(INTERMEDIATE_VALUES_ATTR, {}))
    if str(step) in reported:
        return f"The reported values are ignored because this step={step} is already reported."
    reported[str(step)] = floats
    set_trial_user_attr(study, trial, INTERMEDIATE_VALUES_ATTR, reported)
    return ""


def _float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(
            f"The `value` argument is of type '{type(value)}' but supposed to be a float."
        ) from None


def trial_view(study: optuna.Study, trial: optuna.Trial) -> dict[str, Any]:
    """The trial as the storage holds it now, plus what only the live trial knows."""
    view = _frozen_view(frozen_trial(study, trial), _multi(study))
    return {**view, "constraints": trial.constraints}


def _multi(study: optuna.Study) -> bool:
    return len(study.directions) > 1


def _frozen_view(frozen: FrozenTrial, multi: bool) -> dict[str, Any]:
    reported: Any = frozen.intermediate_values
    if multi:  # the lists `report(values, step)` kept
        reported = frozen.user_attrs.get(INTERMEDIATE_VALUES_ATTR, {})
    return {
        "number": frozen.number,
        "state": frozen.state.name,
        "values": None if frozen.values is None else [float(v) for v in frozen.values],
        "params": dict(frozen.params),
        "distributions": {k: distribution_to_json(d) for k, d in frozen.distributions.items()},
        "user_attrs": dict(frozen.user_attrs),
        "system_attrs": dict(frozen.system_attrs),
        "intermediate_values": {str(k): v for k, v in reported.items()},
        "datetime_start": _iso(frozen.datetime_start),
        "datetime_complete": _iso(frozen.datetime_complete),
    }


def _iso(moment: Any) -> str | None:
    return None if moment is None else str(moment.isoformat())


def study_view(study: optuna.Study) -> dict[str, Any]:
    """The study's name, directions, metric names, attributes, the classes of its sampler and
    pruner, and its best trial(s), as `study.best_*` has them (or the error Optuna raises for
    them: no completed trial yet, or a multi-objective study)."""
    view: dict[str, Any] = {
        "study_name": study.study_name,
        "directions": [d.name for d in study.directions],
        "metric_names": study.metric_names,
        "sampler": _class_of(study.sampler),
        "pruner": _class_of(study.pruner),
        "user_attrs": dict(study.user_attrs),
        "system_attrs": study_system_attrs(study),
        "best_trial": None,
        "best_trial_error": None,
        "best_trials": [_frozen_view(t, _multi(study)) for t in study.best_trials],
    }
    try:
        view["best_trial"] = _frozen_view(study.best_trial, _multi(study))
    except (ValueError, RuntimeError) as exc:
        view["best_trial_error"] = [type(exc).__name__, str(exc)]
    return view


def _class_of(component: object) -> list[str]:
    """Where the class of a sampler or pruner is defined: [module, qualified name]."""
    cls = type(component)
    return [cls.__module__, cls.__qualname__]


def relative_search_space_view(trial: optuna.Trial) -> dict[str, Any] | None:
    """`trial.relative_search_space` (Optuna's JSON per distribution): None until the sampler
    inferred it, at the trial's first suggestion or `relative_params`, as in-process."""
    space = trial.relative_search_space
    return None if space is None else {k: distribution_to_json(d) for k, d in space.items()}


def study_trials_view(study: optuna.Study) -> list[dict[str, Any]]:
    """The study's finished trials (COMPLETE, PRUNED, FAIL), oldest first."""
    finished = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False, states=finished)
    return [_frozen_view(t, _multi(study)) for t in trials]
