"""What an Optimizer accepts as its objective, checked before anything runs: a callback taking
`trial`, a flytekit task (or workflow), sync or async, and for workers a `module:function` path.

flytekit is optional: it is only looked at when the caller already imported it.
"""

from __future__ import annotations

import inspect
import sys
from typing import Any

from optuna_rq.errors import ConfigError
from optuna_rq.protocol import objective_path_of, parse_objective_path

__all__ = ["check_objective", "is_async_task", "remote_objective_path"]


def _flytekit_classes() -> tuple[type, type, type] | None:
    """(AsyncPythonFunctionTask, PythonFunctionTask, WorkflowBase), if flytekit is in use.

    A flytekit task can only exist if flytekit was imported, so we never import it ourselves.
    """
    if "flytekit" not in sys.modules:
        return None
    from flytekit.core.python_function_task import AsyncPythonFunctionTask, PythonFunctionTask
    from flytekit.core.workflow import WorkflowBase

    return AsyncPythonFunctionTask, PythonFunctionTask, WorkflowBase


def is_async_task(obj: object) -> bool:
    classes = _flytekit_classes()
    return classes is not None and isinstance(obj, classes[0])


def check_task_returns(task: Any, n_objectives: int) -> None:
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


def check_objective(objective: object, n_objectives: int) -> None:
    classes = _flytekit_classes()
    if classes is not None:
        async_task, function_task, workflow = classes
        if isinstance(objective, async_task):
            check_task_returns(objective, n_objectives)
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


def remote_objective_path(objective: object, n_objectives: int) -> str:
    """The `module:function` workers import: given as a string, or derived from the function."""
    if isinstance(objective, str):
        parse_objective_path(objective)
        return objective
    if is_async_task(objective):
        check_task_returns(objective, n_objectives)
    elif not callable(objective):
        raise ConfigError(
            "a remote objective must be a 'module:function' string, a top-level function or a "
            f"flytekit task, got {type(objective).__name__}: {objective!r}"
        )
    return objective_path_of(objective)
