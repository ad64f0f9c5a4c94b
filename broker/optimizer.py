"""`Optimizer` and `optimize`: the flytekitplugins.optuna 1.16 API, run in-process or on workers.

In-process, this behaves as the original does (same names, signatures, defaults, validation
errors), with three things made right: a trial whose objective raises ends FAIL with its reason
and the run goes on (the original leaves it RUNNING and aborts); a NaN or malformed result ends
FAIL instead of raising inside `tell`; an `optuna.TrialPruned` ends the trial PRUNED.

flytekit is optional: it is only looked at when the caller already imported it, so
`import broker` stays light.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import sys
import traceback
from collections.abc import Awaitable, Callable
from copy import deepcopy
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeAlias

import optuna
from optuna.trial import TrialState

from broker.errors import ConfigError
from broker.space import Category, Float, Integer, Number, Suggestion, process, suggest

__all__ = [
    "FAIL_ERROR_ATTR",
    "FAIL_REASON_ATTR",
    "Category",
    "Float",
    "Integer",
    "Number",
    "Optimizer",
    "P",
    "Result",
    "Suggestion",
    "optimize",
    "process",
    "suggest",
]

P = ParamSpec("P")

Result: TypeAlias = float | tuple[float, ...]

CallbackType: TypeAlias = Callable[Concatenate[optuna.Trial, P], Awaitable[Result] | Result]

# A failed trial carries why, and the error text, as user attributes: they show up in
# optuna-dashboard and in `study.trials_dataframe()` without any tooling of ours.
FAIL_REASON_ATTR = "fail_reason"
FAIL_ERROR_ATTR = "fail_error"
_MAX_ERROR_CHARS = 4000


def _flytekit_classes() -> tuple[type, type, type] | None:
    """(AsyncPythonFunctionTask, PythonFunctionTask, WorkflowBase), if flytekit is in use.

    A flytekit task can only exist if flytekit was imported, so we never import it ourselves.
    """
    if "flytekit" not in sys.modules:
        return None
    from flytekit.core.python_function_task import AsyncPythonFunctionTask, PythonFunctionTask
    from flytekit.core.workflow import WorkflowBase

    return AsyncPythonFunctionTask, PythonFunctionTask, WorkflowBase


def _is_async_task(obj: object) -> bool:
    classes = _flytekit_classes()
    return classes is not None and isinstance(obj, classes[0])


def _check_task_returns(task: Any, n_objectives: int) -> None:
    """The flytekit task's return annotation must match the study's number of directions."""
    try:  # resolve `from __future__ import annotations` strings, as flytekit itself does
        returns = inspect.signature(task.task_function, eval_str=True).return_annotation
    except (NameError, TypeError):
        returns = inspect.signature(task.task_function).return_annotation
    name = getattr(task, "name", repr(task))
    if returns is float:
        if n_objectives != 1:
            raise ConfigError(
                "the study must have a single objective if objective returns a single float: "
                f"{name} returns float but the study has {n_objectives} directions"
            )
        return
    args = getattr(returns, "__args__", None)
    if args is None:
        raise ConfigError(
            "objective function must return a float or tuple of floats: "
            f"{name} is annotated to return {returns!r}"
        )
    if len(args) != n_objectives:
        raise ConfigError(
            "objective must return the same number of directions in the study: "
            f"{name} returns {len(args)} values but the study has {n_objectives} directions"
        )
    if not all(arg is float for arg in args):
        raise ConfigError(
            "objective function must return a float or tuple of floats: "
            f"{name} is annotated to return {returns!r}"
        )


def _check_objective(objective: object, n_objectives: int) -> None:
    classes = _flytekit_classes()
    if classes is not None:
        async_task, function_task, workflow = classes
        if isinstance(objective, async_task):
            _check_task_returns(objective, n_objectives)
            return
        if isinstance(objective, workflow):
            raise ConfigError(
                "objective must be a callable or a AsyncPythonFunctionTask, not a flytekit "
                f"workflow ({getattr(objective, 'name', objective)!r}): optimize an async task "
                "(`@task async def ...`) or a callback taking `trial`"
            )
        if isinstance(objective, function_task):
            raise ConfigError(
                "objective must be a callable or a AsyncPythonFunctionTask: "
                f"{getattr(objective, 'name', objective)!r} is a synchronous flytekit task; "
                "declare it `async def` so trials can run concurrently"
            )
    if not callable(objective):
        raise ConfigError(
            "objective must be a callable or a AsyncPythonFunctionTask, "
            f"got {type(objective).__name__}: {objective!r}"
        )
    if "trial" not in inspect.signature(objective).parameters:
        raise ConfigError(
            "objective function must have a parameter called 'trial' if not a "
            f"AsyncPythonFunctionTask: {getattr(objective, '__qualname__', objective)!r} has "
            f"parameters {list(inspect.signature(objective).parameters)}"
        )


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be an integer greater than 0, got {value!r}")


@dataclass(frozen=True)
class Verdict:
    """How one trial ends: the values to tell, or the state and failure reason."""

    state: TrialState
    values: list[float] | None = None
    fail_reason: str | None = None
    error: str | None = None


def judge_result(result: object, n_objectives: int) -> Verdict:
    """Turn what an objective returned into a verdict; anything but finite floats is FAIL.

    A float (or int) for one objective; a tuple or list of them, one per direction, for several.
    NaN is left to Optuna to record as FAIL (told with `state=None`), but flagged `bad_return`.
    """
    items: list[object]
    if isinstance(result, (tuple, list)):
        items = list(result)
    else:
        items = [result]
    if len(items) != n_objectives or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in items
    ):
        return Verdict(
            state=TrialState.FAIL,
            fail_reason="bad_return",
            error=(
                f"objective returned {result!r} ({type(result).__name__}); expected "
                + ("a float" if n_objectives == 1 else f"a tuple of {n_objectives} floats")
            ),
        )
    values = [float(v) for v in items]  # type: ignore[arg-type]
    if any(math.isnan(v) for v in values):
        return Verdict(
            state=TrialState.FAIL,
            values=values,
            fail_reason="bad_return",
            error=f"objective returned NaN: {result!r}",
        )
    return Verdict(state=TrialState.COMPLETE, values=values)


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
        storage.set_trial_user_attr(trial_id, FAIL_ERROR_ATTR, error[-_MAX_ERROR_CHARS:])


def _trial_id(study: optuna.Study, number: int) -> int:
    return study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)


def describe_exception(exc: BaseException) -> str:
    """The error text stored on a failed trial: the exception line, then the traceback."""
    text = "".join(traceback.format_exception(exc))
    return text[-_MAX_ERROR_CHARS:]


@dataclass
class Optimizer:
    """Run `n_trials` trials of an Optuna study, at most `concurrency` at a time.

    Args:
        objective: either a callback taking a `trial` parameter (sync or async, called as
            `objective(trial=trial, **inputs)` with the inputs as given), or a flytekit
            `AsyncPythonFunctionTask` (called inside `@flytekit.eager` with the inputs after
            `process()` replaced every suggestion by a sampled value).
        concurrency: how many trials may run at once (an int > 0).
        n_trials: how many trials to run in total (an int > 0).
        study: the Optuna study to optimise; `optuna.create_study()` if None. It holds the
            results afterwards (`optimizer.study.best_params`).
        delay: seconds to wait before starting each trial (an int >= 0).

    Raises:
        ValueError (`broker.errors.ConfigError`): for any invalid argument, naming it.

    A trial ends COMPLETE with its value(s), PRUNED when the objective raises
    `optuna.TrialPruned`, or FAIL with a `fail_reason` user attribute (`exception`,
    `bad_return`) and the error text in `fail_error`; the run goes on either way.
    """

    objective: CallbackType[...] | Any
    concurrency: int
    n_trials: int
    study: optuna.Study | None = None
    delay: int = 0

    def __post_init__(self) -> None:
        if self.study is None:
            self.study = optuna.create_study()

        _positive_int("concurrency", self.concurrency)
        _positive_int("n_trials", self.n_trials)

        if not isinstance(self.study, optuna.Study):
            raise ConfigError(
                f"study must be an optuna.Study, got {type(self.study).__name__}: {self.study!r}"
            )

        if isinstance(self.delay, bool) or not isinstance(self.delay, int) or self.delay < 0:
            raise ConfigError(
                f"delay must be an integer greater than or equal to 0, got {self.delay!r}"
            )

        _check_objective(self.objective, len(self.study.directions))

    @property
    def is_imperative(self) -> bool:
        """True when the objective is a flytekit async task fed with processed inputs."""
        return _is_async_task(self.objective)

    @property
    def _study(self) -> optuna.Study:
        assert self.study is not None  # set in __post_init__
        return self.study

    async def __call__(self, **inputs: Any) -> None:
        """Run all trials; return when every one of them has been told to the study."""
        semaphore = asyncio.Semaphore(self.concurrency)
        trials = [self.spawn(semaphore, deepcopy(inputs)) for _ in range(self.n_trials)]
        await asyncio.gather(*trials)

    def run(self, **inputs: Any) -> optuna.Study:
        """Synchronous `await optimizer(**inputs)` for scripts; returns the study."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            asyncio.run(self(**inputs))
            return self._study
        raise RuntimeError(
            "Optimizer.run() cannot be called from a running event loop: "
            "use `await optimizer(**inputs)` there"
        )

    async def spawn(self, semaphore: asyncio.Semaphore, inputs: dict[str, Any]) -> None:
        """Run one trial under `semaphore`: wait `delay`, ask, run the objective, tell."""
        async with semaphore:
            await asyncio.sleep(self.delay)
            study = self._study
            trial = study.ask()
            objective: Any = self.objective  # a callback or a flytekit task: checked on init
            try:
                if self.is_imperative:
                    result = await objective(**process(trial, inputs))
                else:
                    out = objective(trial=trial, **inputs)
                    result = await out if inspect.isawaitable(out) else out
            except optuna.TrialPruned:
                tell(study, trial, Verdict(state=TrialState.PRUNED))
            except Exception as exc:
                tell(
                    study,
                    trial,
                    Verdict(
                        state=TrialState.FAIL,
                        fail_reason="exception",
                        error=describe_exception(exc),
                    ),
                )
            except BaseException as exc:  # cancelled or interrupted: never leave it RUNNING
                tell(
                    study,
                    trial,
                    Verdict(
                        state=TrialState.FAIL,
                        fail_reason="cancelled",
                        error=f"{type(exc).__name__}: the run was stopped",
                    ),
                )
                raise
            else:
                tell(study, trial, judge_result(result, len(study.directions)))


def optimize(
    objective: CallbackType[...] | Any | None = None,
    concurrency: int = 1,
    n_trials: int = 1,
    study: optuna.Study | None = None,
) -> Any:
    """Decorate an objective into an `Optimizer`: `@optimize` or `@optimize(n_trials=..., ...)`."""
    if objective is not None:
        if callable(objective) or _is_async_task(objective):
            return Optimizer(
                objective=objective, concurrency=concurrency, n_trials=n_trials, study=study
            )
        raise ConfigError(
            "This decorator must be called with a callable or a flyte Task, "
            f"got {type(objective).__name__}: {objective!r}"
        )

    def decorator(objective: CallbackType[...] | Any) -> Optimizer:
        return Optimizer(
            objective=objective, concurrency=concurrency, n_trials=n_trials, study=study
        )

    return decorator
