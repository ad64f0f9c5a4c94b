"""flytekit async tasks as objectives, inside @flytekit.eager, as flytekitplugins.optuna does."""

from __future__ import annotations

import asyncio
import math
from typing import Union

import optuna
import pytest
from optuna.trial import TrialState

fl = pytest.importorskip("flytekit", reason="the `flyte` extra is not installed")

# flytekit's eager runner asks pip for the installed packages (a `pip list` subprocess).
pytestmark = pytest.mark.processes

from optuna_rq import Optimizer, optimize, suggest  # noqa: E402
from optuna_rq.optimizer import FAIL_REASON_ATTR  # noqa: E402


@fl.task
async def loss(x: float, y: int, z: int, power: int) -> float:
    return math.log(((x - 5) ** 2) + (y + 4) ** 4 + (3 * z - 3) ** 2) ** power


@fl.task
async def two_losses(x: float, y: int) -> tuple[float, float]:
    return (x - 1) ** 2, float(y * y)


@fl.task
async def bundled(suggestions: dict[str, Union[int, float]], power: int) -> float:  # noqa: UP007
    return float(abs(suggestions["x"]) + abs(suggestions["y"])) ** power


@fl.task
async def sometimes_fails(x: float) -> float:
    if x > 0:
        raise ValueError(f"x={x} is positive")
    return x


@fl.task
def sync_task(x: float) -> float:
    return x


@fl.task
async def returns_str(x: float) -> str:
    return "abc"


@fl.task
async def returns_int(x: float) -> int:
    return 1


@fl.workflow
def workflow(x: float) -> float:
    return sync_task(x=x)


def test_task_objective_is_imperative_and_runs_inside_eager() -> None:
    @fl.eager
    async def train(concurrency: int, n_trials: int) -> float:
        optimizer = Optimizer(loss, concurrency, n_trials)
        assert optimizer.is_imperative
        await optimizer(
            x=suggest.float(low=-10, high=10),
            y=suggest.integer(low=-10, high=10),
            z=suggest.category([-5, 0, 3, 6, 9]),
            power=2,
        )
        assert len(optimizer.study.trials) == n_trials
        assert all(t.state is TrialState.COMPLETE for t in optimizer.study.trials)
        assert set(optimizer.study.best_params) == {"x", "y", "z"}
        return optimizer.study.best_value

    value = asyncio.run(train(concurrency=2, n_trials=10))
    assert isinstance(value, float)


def test_nested_dict_inputs_reach_the_task_nested_and_are_recorded_dotted() -> None:
    @fl.eager
    async def train() -> float:
        optimizer = Optimizer(bundled, concurrency=2, n_trials=6)
        await optimizer(
            suggestions={"x": suggest.float(-1, 1), "y": suggest.integer(-3, 3)}, power=1
        )
        trial = optimizer.study.best_trial
        assert set(trial.params) == {"suggestions.x", "suggestions.y"}
        assert trial.value == pytest.approx(
            abs(trial.params["suggestions.x"]) + abs(trial.params["suggestions.y"])
        )
        return optimizer.study.best_value

    assert isinstance(asyncio.run(train()), float)


def test_tuple_returning_task_with_a_multi_objective_study() -> None:
    @fl.eager
    async def train() -> int:
        study = optuna.create_study(directions=["minimize", "minimize"])
        optimizer = Optimizer(two_losses, concurrency=2, n_trials=6, study=study)
        await optimizer(x=suggest.float(-2, 2), y=suggest.integer(-2, 2))
        assert all(len(t.values) == 2 for t in study.trials)
        return len(study.best_trials)

    assert asyncio.run(train()) >= 1


def test_a_failing_task_fails_its_trial_and_the_run_goes_on() -> None:
    @fl.eager
    async def train() -> int:
        study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
        optimizer = Optimizer(sometimes_fails, concurrency=2, n_trials=8, study=study)
        await optimizer(x=suggest.float(-1, 1))
        assert len(study.trials) == 8
        failed = [t for t in study.trials if t.state is TrialState.FAIL]
        assert failed and all(t.params["x"] > 0 for t in failed)
        assert all(t.user_attrs[FAIL_REASON_ATTR] == "exception" for t in failed)
        return len(failed)

    assert asyncio.run(train()) > 0


def test_optimize_decorates_a_task() -> None:
    @fl.eager
    async def train() -> float:
        @optimize(concurrency=2, n_trials=4)
        @fl.task
        async def optimizer(x: float, y: int) -> float:
            return x + y

        await optimizer(x=suggest.float(0, 1), y=suggest.integer(0, 3))
        assert len(optimizer.study.trials) == 4
        return optimizer.study.best_value

    assert isinstance(asyncio.run(train()), float)


def test_callback_calling_a_task_inside_eager() -> None:
    def callback(trial: optuna.Trial, power: int) -> object:
        # returns the task's coroutine: the optimizer awaits it, as the original does
        return loss(
            x=trial.suggest_float("x", -10, 10),
            y=trial.suggest_int("y", -10, 10),
            z=trial.suggest_categorical("z", [-5, 0, 3]),
            power=power,
        )

    @fl.eager
    async def train() -> float:
        optimizer = Optimizer(callback, concurrency=2, n_trials=4)
        await optimizer(power=2)
        return optimizer.study.best_value

    assert isinstance(asyncio.run(train()), float)


@pytest.mark.parametrize(
    ("objective", "directions", "message"),
    [
        (workflow, 1, "not a flytekit workflow"),
        (sync_task, 1, "synchronous flytekit task"),
        (returns_str, 1, "must return a float or tuple of floats"),
        (returns_int, 1, "must return a float or tuple of floats"),
        (loss, 2, "single objective"),
        (two_losses, 1, "same number of directions"),
        (two_losses, 3, "same number of directions"),
    ],
)
def test_task_validation(objective: object, directions: int, message: str) -> None:
    study = optuna.create_study(directions=["minimize"] * directions)
    with pytest.raises(ValueError, match=message):
        Optimizer(objective, concurrency=1, n_trials=1, study=study)
