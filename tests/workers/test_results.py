"""What an objective returns is taken as Optuna's `study.tell` takes it, on workers and
in-process alike: numpy scalars, 0-d arrays, sequences of them, bools, infinities; NaN and what
cannot be a value end FAIL (`bad_return`) with Optuna's reason.

Optuna itself is the judge: each kind is told to a real study with `study.tell` (as
`study.optimize` and flytekitplugins.optuna tell it), and the trial run through optuna-rq must
end the same way, with the same values.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from optuna_rq import Optimizer
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from tests.support import result_objectives
from tests.support.inline_workers import InlineWorkers
from tests.support.result_objectives import MULTI, SINGLE, Returns

pytestmark = pytest.mark.timeout(120)

MODULE = ("tests.support.result_objectives",)
STRINGS = ("str", "numeric str")  # Optuna iterates them as characters: our reason names them


def directions(n: int) -> list[str]:
    return ["minimize"] * n


def optuna_tells(value: object, n_objectives: int) -> tuple[TrialState, list[float] | None, str]:
    """How `study.tell(trial, value)` ends a trial: its state, values and the reason Optuna
    warns of ("" if none). Optuna raises on some values it cannot even check (a numeric
    string, an int beyond a double): that is a refusal too."""
    study = optuna.create_study(directions=directions(n_objectives))
    trial = study.ask()
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            study.tell(trial, value)  # type: ignore[arg-type]
        except Exception:
            return TrialState.FAIL, None, ""
    [frozen] = study.trials
    reason = next((str(w.message) for w in said if "value" in str(w.message)), "")
    return frozen.state, frozen.values, reason


def assert_told_as_optuna_tells(trial: FrozenTrial, kind: str, kinds: Returns, n: int) -> None:
    state, values, reason = optuna_tells(kinds[kind](), n)
    assert trial.state is state, (kind, trial.user_attrs.get(FAIL_ERROR_ATTR))
    if state is TrialState.COMPLETE:
        assert trial.values == values, kind
        assert all(type(v) is float for v in trial.values), kind
        return
    assert trial.user_attrs[FAIL_REASON_ATTR] == "bad_return", kind
    error = trial.user_attrs[FAIL_ERROR_ATTR]
    if kind in STRINGS:
        assert f"The value {kinds[kind]()!r} could not be cast to float" in error, error
    elif reason:
        assert reason.rstrip(".") in error, (kind, reason, error)
    else:  # Optuna raised: the value is named, and why
        assert "could not be cast to float" in error, (kind, error)


def kinds_of(n_objectives: int) -> Returns:
    return SINGLE if n_objectives == 1 else MULTI


def test_the_kinds_cover_what_optuna_takes_and_refuses() -> None:
    """The enumeration itself, judged by Optuna: the taken kinds complete (or, NaN, fail as
    Optuna records it), the refused ones do not."""
    for taken, refused, n in (
        (result_objectives.SINGLE_TAKEN, result_objectives.SINGLE_REFUSED, 1),
        (result_objectives.MULTI_TAKEN, result_objectives.MULTI_REFUSED, 2),
    ):
        for kind, make in taken.items():
            state, _values, reason = optuna_tells(make(), n)
            assert state is TrialState.COMPLETE or "not acceptable" in reason, kind
        for kind, make in refused.items():
            assert optuna_tells(make(), n)[0] is TrialState.FAIL, kind


def returning(make: Callable[[], object]) -> Callable[[optuna.Trial], object]:
    def objective(trial: optuna.Trial) -> object:
        return make()

    return objective


@pytest.mark.parametrize(
    ("kind", "n_objectives"), [(k, 1) for k in SINGLE] + [(k, 2) for k in MULTI]
)
def test_in_process_a_return_ends_as_study_tell_ends_it(kind: str, n_objectives: int) -> None:
    kinds = kinds_of(n_objectives)
    study = optuna.create_study(directions=directions(n_objectives))
    Optimizer(returning(kinds[kind]), concurrency=1, n_trials=1, study=study).run()
    [trial] = study.trials
    assert_told_as_optuna_tells(trial, kind, kinds, n_objectives)


@pytest.mark.parametrize("n_objectives", [1, 2])
def test_on_a_worker_every_return_ends_as_study_tell_ends_it(
    redis_url: str, inline_workers: InlineWorkers, n_objectives: int
) -> None:
    prefix = inline_workers.start(count=2, modules=MODULE)
    kinds = kinds_of(n_objectives)
    study = optuna.create_study(directions=directions(n_objectives))
    objective = (
        "tests.support.result_objectives:single"
        if n_objectives == 1
        else ("tests.support.result_objectives:multi")
    )
    Optimizer(
        objective,  # type: ignore[arg-type]
        concurrency=2,
        n_trials=len(kinds),
        study=study,
        redis_url=redis_url,
        prefix=prefix,
    ).run()
    trials = study.trials
    assert len(trials) == len(kinds)  # none retried: each ended by its own return
    for trial, kind in zip(trials, kinds, strict=True):
        assert_told_as_optuna_tells(trial, kind, kinds, n_objectives)
