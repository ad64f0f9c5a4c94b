"""Trials in an Optuna storage, reached the one way Optuna's public API does not offer.

The broker's only module that touches Optuna's private API (`study._storage`, `study._study_id`,
`trial._trial_id`, `optuna.Trial(study, trial_id)`, a trial's relative and fixed params): a new
Optuna release breaks this file and no other of the broker's (on workers, `relative_params`
calls `BaseDistribution._contains`, as Optuna's `Trial._suggest` does). Each function takes a
study and either a live `optuna.Trial` or a trial number.
"""

from __future__ import annotations

from collections.abc import Container, Iterator
from contextlib import contextmanager
from typing import Any

import optuna
from optuna.distributions import BaseDistribution, check_distribution_compatibility
from optuna.trial import FrozenTrial, TrialState

__all__ = [
    "create_running_trial",
    "fail_running_trial",
    "frozen_trial",
    "given_relative",
    "live_trial",
    "only_waiting",
    "optimize_loop",
    "record_relative_param",
    "relative_view",
    "set_trial_system_attr",
    "set_study_system_attr",
    "set_trial_user_attr",
    "stop_requested",
    "study_system_attrs",
]


def _trial_id(study: optuna.Study, trial: optuna.Trial | int) -> int:
    if isinstance(trial, optuna.Trial):
        return trial._trial_id
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, trial)


def frozen_trial(study: optuna.Study, trial: optuna.Trial | int) -> FrozenTrial:
    """The trial as the storage holds it now (read afresh, not from a cache of the study)."""
    return study._storage.get_trial(_trial_id(study, trial))


def live_trial(study: optuna.Study, frozen: FrozenTrial) -> optuna.Trial:
    """A `Trial` to suggest on and tell, for a trial already in the storage (RUNNING)."""
    return optuna.Trial(study, frozen._trial_id)


def create_running_trial(
    study: optuna.Study,
    *,
    params: dict[str, Any],
    distributions: dict[str, BaseDistribution],
    user_attrs: dict[str, Any],
    system_attrs: dict[str, Any] | None = None,
    relative: tuple[dict[str, BaseDistribution], dict[str, Any]] | None = None,
) -> optuna.Trial:
    """A new RUNNING trial of `study` with these params already set (the sampler is not asked).
    `relative`: the relative search space and params its sampler gave where it was sampled (the
    sampler process), which it keeps, as a trial asked here would (`relative_view`): its
    sampler is not asked for them again."""
    template = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        params=params,
        distributions=distributions,
        user_attrs=user_attrs,
        system_attrs=system_attrs,
    )
    trial_id = study._storage.create_new_trial(study._study_id, template_trial=template)
    trial = optuna.Trial(study, trial_id)
    if relative is not None:
        trial.relative_search_space, trial._relative_params = relative
    return trial


def fail_running_trial(study: optuna.Study, frozen: FrozenTrial) -> None:
    """End a RUNNING trial FAIL through the storage alone: no `Trial` is built and no sampler
    runs (a tell would run its `after_trial`), for a trial whose sampler is what broke."""
    study._storage.set_trial_state_values(frozen._trial_id, TrialState.FAIL)


def only_waiting(states: Container[TrialState] | None) -> bool:
    """Whether a query for trials in `states` asks for WAITING trials alone (as `study.ask()`
    does, looking for one enqueued)."""
    if states is None:
        return False
    return TrialState.WAITING in states and not any(
        s in states for s in TrialState if s is not TrialState.WAITING
    )


def set_trial_user_attr(
    study: optuna.Study, trial: optuna.Trial | int, key: str, value: Any
) -> None:
    study._storage.set_trial_user_attr(_trial_id(study, trial), key, value)


def set_trial_system_attr(
    study: optuna.Study, trial: optuna.Trial | int, key: str, value: Any
) -> None:
    """Optuna 5 dropped `Trial.set_system_attr`; the storages keep it."""
    study._storage.set_trial_system_attr(_trial_id(study, trial), key, value)


def set_study_system_attr(study: optuna.Study, key: str, value: Any) -> None:
    """Optuna 5 dropped `Study.set_system_attr`; the storages keep it."""
    study._storage.set_study_system_attr(study._study_id, key, value)


def study_system_attrs(study: optuna.Study) -> dict[str, Any]:
    """Optuna 5 dropped `Study.system_attrs`; the storages keep them."""
    return dict(study._storage.get_study_system_attrs(study._study_id))


@contextmanager
def optimize_loop(study: optuna.Study) -> Iterator[None]:
    """In this thread, `study.stop()` works as inside `study.optimize` (elsewhere it raises):
    the caller polls `stop_requested`."""
    local = study._thread_local
    was = local.in_optimize_loop
    local.in_optimize_loop = True
    study._stop_flag = False
    try:
        yield
    finally:
        local.in_optimize_loop = was
        study._stop_flag = False


def stop_requested(study: optuna.Study) -> bool:
    """Whether `study.stop()` was called."""
    return bool(study._stop_flag)


def relative_view(
    trial: optuna.Trial,
) -> tuple[bool, dict[str, BaseDistribution], dict[str, Any], set[str]] | None:
    """The trial's relative search space and params as its sampler gives them (asked now if they
    were not yet), whether they had been asked before, and the names settled: fixed (an
    enqueued trial's) or suggested already. Optuna asks its sampler at a trial's first
    suggestion of a name not settled; asked here, a worker can answer that suggestion itself,
    with what the sampler gave for the same study state (at cap 1).

    None, and the sampler not asked, for a trial made with its params already decided and its
    sampler never asked (a retry of a lost attempt, made from the lost one's params): Optuna
    asks the sampler for such a trial only at a suggestion of a name not settled, which the
    worker then sends to the broker, and asking now would spend the sampler's work, and its
    random state, on a trial that may never need it."""
    asked = trial._relative_params is not None
    if not asked and trial._cached_frozen_trial.params:
        return None
    params = trial.relative_params
    space = dict(trial.relative_search_space or {})
    settled = set(trial._fixed_params) | set(trial._cached_frozen_trial.params)
    return asked, space, params, settled


def given_relative(
    trial: optuna.Trial,
) -> tuple[dict[str, BaseDistribution], dict[str, Any]] | None:
    """The relative search space and params `trial`'s sampler gave, if it was asked (never asks
    it): what `create_running_trial` takes where the trial is made anew."""
    if trial._relative_params is None:
        return None
    return dict(trial.relative_search_space or {}), dict(trial._relative_params)


def record_relative_param(
    trial: optuna.Trial, name: str, distribution: BaseDistribution, value: Any
) -> None:
    """Store param `name` as `trial.suggest_*` stores a relative param, with the value a worker
    took from its request (`relative_view`); ValueError if it is not the one this trial's
    sampler gave, or not in `distribution`. A name suggested already is left as it is, as a
    suggestion repeated is."""
    latest = trial._cached_frozen_trial
    if name in latest.distributions:
        check_distribution_compatibility(latest.distributions[name], distribution)
        return
    given = trial._relative_params  # None on a trial taken over after a restart: not asked
    if given is not None and (name not in given or not _same(given[name], value, distribution)):
        raise ValueError(f"{name}={value!r} is not the relative param the sampler gave")
    internal = distribution.to_internal_repr(value)
    if not distribution._contains(internal):
        raise ValueError(f"{name}={value!r} is not in {distribution}")
    trial.storage.set_trial_param(trial._trial_id, name, internal, distribution)
    latest.distributions[name] = distribution
    latest.params[name] = value


def _same(given: Any, value: Any, distribution: BaseDistribution) -> bool:
    return bool(distribution.to_internal_repr(given) == distribution.to_internal_repr(value))
