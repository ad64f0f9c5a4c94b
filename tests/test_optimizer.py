"""The Optimizer API in-process: validation as flytekitplugins.optuna; trials that always end."""

from __future__ import annotations

import asyncio
import math

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import ConfigError, Optimizer, optimize, suggest
from optuna_rq.optimizer import FAIL_ERROR_ATTR, FAIL_REASON_ATTR


def callback(trial: optuna.Trial, offset: float = 0.0) -> float:
    x = trial.suggest_float("x", -10, 10)
    return (x - 2) ** 2 + offset


@pytest.mark.parametrize("value", [-1, 0, "abc", 1.5, True, None])
def test_concurrency_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(ValueError, match="concurrency must be an integer greater than 0"):
        Optimizer(callback, concurrency=value, n_trials=10)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-10, 0, "abc", 2.0, False])
def test_n_trials_must_be_a_positive_int(value: object) -> None:
    with pytest.raises(ValueError, match="n_trials must be an integer greater than 0") as info:
        Optimizer(callback, concurrency=3, n_trials=value)  # type: ignore[arg-type]
    assert repr(value) in str(info.value)


def test_study_must_be_a_study() -> None:
    with pytest.raises(ValueError, match="study must be an optuna.Study"):
        Optimizer(callback, concurrency=3, n_trials=10, study="abc")  # type: ignore[arg-type]


@pytest.mark.parametrize("value", [-1, "abc", 0.5])
def test_delay_must_be_a_non_negative_int(value: object) -> None:
    with pytest.raises(ValueError, match="delay must be an integer greater than or equal to 0"):
        Optimizer(callback, concurrency=3, n_trials=10, delay=value)  # type: ignore[arg-type]


def test_callback_without_trial_parameter_is_refused() -> None:
    def no_trial(value: float) -> float:
        return 1.0

    with pytest.raises(ValueError, match="parameter called 'trial'") as info:
        Optimizer(no_trial, concurrency=3, n_trials=10)
    assert "['value']" in str(info.value)


def test_non_callable_objective_is_refused() -> None:
    with pytest.raises(ConfigError, match="must be a callable"):
        Optimizer(42, concurrency=1, n_trials=1)


def test_validation_errors_are_both_value_errors_and_ours() -> None:
    from optuna_rq import OptunaRQError

    with pytest.raises(OptunaRQError):
        Optimizer(callback, concurrency=0, n_trials=1)


def test_defaults_create_a_study_and_keep_the_original_field_order() -> None:
    opt = Optimizer(callback, 2, 5)
    assert isinstance(opt.study, optuna.Study)
    assert (opt.concurrency, opt.n_trials, opt.delay) == (2, 5, 0)
    assert opt.is_imperative is False


def test_sync_callback_runs_all_trials() -> None:
    opt = Optimizer(callback, concurrency=2, n_trials=12)
    asyncio.run(opt(offset=1.0))
    trials = opt.study.trials
    assert len(trials) == 12
    assert all(t.state is TrialState.COMPLETE for t in trials)
    assert opt.study.best_value >= 1.0
    assert all(t.value == pytest.approx((t.params["x"] - 2) ** 2 + 1.0) for t in trials)


def test_async_callback_runs_all_trials_with_a_maximize_study() -> None:
    async def objective(trial: optuna.Trial, fixed: str) -> float:
        await asyncio.sleep(0)
        letter = trial.suggest_categorical("letter", ["A", "BB", "CCC"])
        return float(len(letter) + len(fixed))

    study = optuna.create_study(direction="maximize")
    opt = Optimizer(objective, concurrency=3, n_trials=9, study=study)
    asyncio.run(opt(fixed="hello!"))
    assert len(study.trials) == 9
    assert study.best_value <= 9.0
    assert all(t.state is TrialState.COMPLETE for t in study.trials)


def test_callback_receives_inputs_as_given_not_processed() -> None:
    seen: list[object] = []

    def objective(trial: optuna.Trial, space: object) -> float:
        seen.append(space)
        return 0.0

    space = suggest.float(0.0, 1.0)
    asyncio.run(Optimizer(objective, concurrency=1, n_trials=2)(space=space))
    assert seen == [space, space]
    assert seen[0] is not space  # each trial gets a deep copy


def test_in_process_concurrency_never_exceeds_the_cap() -> None:
    running = 0
    peak = 0

    async def objective(trial: optuna.Trial) -> float:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        return trial.suggest_float("x", 0, 1)

    opt = Optimizer(objective, concurrency=3, n_trials=20)
    asyncio.run(opt())
    assert peak == 3
    assert len(opt.study.trials) == 20


def test_an_exception_fails_its_trial_and_the_run_goes_on() -> None:
    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_int("x", 0, 9)
        if trial.number % 2 == 0:
            raise RuntimeError(f"boom at {x}")
        return float(x)

    opt = Optimizer(objective, concurrency=2, n_trials=6)
    asyncio.run(opt())
    states = {t.number: t.state for t in opt.study.trials}
    assert states == {n: TrialState.FAIL if n % 2 == 0 else TrialState.COMPLETE for n in range(6)}
    failed = opt.study.trials[0]
    assert failed.user_attrs[FAIL_REASON_ATTR] == "exception"
    assert "RuntimeError: boom at" in failed.user_attrs[FAIL_ERROR_ATTR]


def test_nan_and_bad_returns_become_fail_never_running() -> None:
    returns = [math.nan, "not a number", (1.0, 2.0), 3.0, None]

    def objective(trial: optuna.Trial) -> object:
        return returns[trial.number]

    opt = Optimizer(objective, concurrency=1, n_trials=len(returns))
    asyncio.run(opt())
    trials = opt.study.trials
    assert [t.state for t in trials] == [
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.FAIL,
        TrialState.COMPLETE,
        TrialState.FAIL,
    ]
    assert all(
        t.user_attrs[FAIL_REASON_ATTR] == "bad_return" for t in trials if t.state.name == "FAIL"
    )
    assert "The value nan is not acceptable" in trials[0].user_attrs[FAIL_ERROR_ATTR]


def test_pruned_objective_ends_pruned() -> None:
    def objective(trial: optuna.Trial) -> float:
        trial.report(1.0, step=0)
        raise optuna.TrialPruned()

    opt = Optimizer(objective, concurrency=1, n_trials=2)
    asyncio.run(opt())
    assert [t.state for t in opt.study.trials] == [TrialState.PRUNED] * 2


def test_multi_objective_callback() -> None:
    def objective(trial: optuna.Trial) -> tuple[float, float]:
        x = trial.suggest_float("x", 0, 1)
        return x, 1 - x

    study = optuna.create_study(directions=["minimize", "minimize"])
    Optimizer(objective, concurrency=2, n_trials=8, study=study).run()
    assert len(study.best_trials) >= 1
    assert all(len(t.values) == 2 for t in study.trials)


def test_run_is_a_synchronous_call_and_refuses_a_running_loop() -> None:
    opt = Optimizer(callback, concurrency=1, n_trials=3)
    assert opt.run() is opt.study
    assert len(opt.study.trials) == 3

    async def inside() -> None:
        opt.run()

    with pytest.raises(RuntimeError, match="await optimizer"):
        asyncio.run(inside())


def test_delay_waits_before_each_trial() -> None:
    async def main() -> list[float]:
        loop = asyncio.get_running_loop()
        starts: list[float] = []

        def objective(trial: optuna.Trial) -> float:
            starts.append(loop.time())
            return 0.0

        opt = Optimizer(objective, concurrency=1, n_trials=2, delay=1)
        t0 = loop.time()
        await opt()
        return [s - t0 for s in starts]

    starts = asyncio.run(main())
    # behaviour, not speed: each trial started only after its delay had passed
    assert starts[0] >= 1.0 and starts[1] >= 2.0


def test_optimize_decorator_bare_and_with_arguments() -> None:
    @optimize
    def bare(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1)

    assert isinstance(bare, Optimizer) and (bare.concurrency, bare.n_trials) == (1, 1)
    bare.run()
    assert len(bare.study.trials) == 1

    study = optuna.create_study(direction="maximize")

    @optimize(n_trials=5, concurrency=2, study=study)
    def configured(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1)

    assert configured.study is study
    configured.run()
    assert len(study.trials) == 5


def test_optimize_refuses_a_non_callable() -> None:
    with pytest.raises(ValueError, match="must be called with a callable or a flyte Task"):
        optimize("not callable")


def test_a_cancelled_run_leaves_no_trial_running() -> None:
    async def objective(trial: optuna.Trial) -> float:
        await asyncio.sleep(60)
        return 0.0

    opt = Optimizer(objective, concurrency=2, n_trials=4)

    async def main() -> None:
        task = asyncio.create_task(opt())
        while len(opt.study.trials) < 2:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert [t.state for t in opt.study.trials] == [TrialState.FAIL, TrialState.FAIL]
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in opt.study.trials} == {"cancelled"}


def test_public_signatures_match_flytekitplugins_optuna() -> None:
    import dataclasses
    import inspect

    import optuna_rq
    from optuna_rq import Category, Float, Integer, process

    fields = [(f.name, f.default, f.kw_only) for f in dataclasses.fields(Optimizer)]
    assert fields[:5] == [
        ("objective", dataclasses.MISSING, False),
        ("concurrency", dataclasses.MISSING, False),
        ("n_trials", dataclasses.MISSING, False),
        ("study", None, False),
        ("delay", 0, False),
    ]
    assert all(kw_only for _, _, kw_only in fields[5:])  # our additions never shift positions
    params = inspect.signature(optimize).parameters
    assert [(p.name, p.default) for p in params.values()] == [
        ("objective", None),
        ("concurrency", 1),
        ("n_trials", 1),
        ("study", None),
    ]
    assert list(inspect.signature(process).parameters) == ["trial", "inputs", "root"]
    assert [f.name for f in dataclasses.fields(Float)] == ["low", "high", "step", "log"]
    assert [f.default for f in dataclasses.fields(Integer)][2:] == [1, False]
    assert [f.name for f in dataclasses.fields(Category)] == ["choices"]
    assert {"Optimizer", "optimize", "suggest", "Float", "Integer", "Category", "Number"} <= set(
        optuna_rq.__all__
    )
    from optuna_rq.optimizer import P, suggest

    assert P.__name__ == "P" and suggest.float is Float
