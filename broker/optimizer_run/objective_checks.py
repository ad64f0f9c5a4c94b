"""What an Optimizer accepts as its objective, checked before anything runs: a callback taking
`trial`, a flytekit task (or workflow), sync or async, and for workers a `module:function` path;
and, where the objective imports, that it takes the space's inputs (`check_inputs_here`).

flytekit is optional: it is only looked at when the caller already imported it.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from optuna_rq.errors import ConfigError
from optuna_rq.protocol import inputs_mismatch, objective_path_of, parse_objective_path

__all__ = ["check_inputs_here", "check_objective", "is_async_task", "remote_objective_path"]


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


def check_inputs_here(objective: str, inputs: Iterable[str]) -> str | None:
    """Check, before a study is sent, that the objective `module:function` takes the space's
    top-level `inputs` (`protocol.objectives.inputs_mismatch`), if it imports here: from the current
    directory, as workers import it. ConfigError naming the missing and unexpected names, or a
    function the module lacks: a definition error, found before any budget is spent.

    Not checked where the module is not here (a laptop submitting to a cluster) or does not
    import (it needs a package only the workers have): the workers check it then, on the first
    trial. Returns a note saying so in the second case (None otherwise), for a line on stderr.
    Whatever the module prints on import goes to stderr, so a command's output stays its own.
    """
    module_name, function_name = parse_objective_path(objective)
    with _importing_from_cwd(), contextlib.redirect_stdout(sys.stderr):
        # Its code runs: whatever it raises, a module that exits on import (argparse at the
        # top) included, means it does not import here.
        try:
            if importlib.util.find_spec(module_name.partition(".")[0]) is None:
                return None  # not here at all: nothing of it runs
            module = importlib.import_module(module_name)
        except (Exception, SystemExit) as exc:
            return (
                f"{module_name} does not import here ({type(exc).__name__}: {exc}): the workers "
                f"check that {function_name} takes the space's inputs, on the first trial"
            )
    function = getattr(module, function_name, None)
    if function is None:
        raise ConfigError(
            f"objective {objective!r}: module {module_name!r} ({module.__file__}) has no "
            f"function {function_name!r}; check the name after the ':'"
        )
    if not callable(function):
        raise ConfigError(
            f"objective {objective!r}: {function_name!r} in {module_name!r} is a "
            f"{type(function).__name__}, not a function"
        )
    mismatch = inputs_mismatch(function, inputs)
    if mismatch is not None:
        raise ConfigError(f"objective {objective!r}: {mismatch}")
    return None


@contextlib.contextmanager
def _importing_from_cwd() -> Iterator[None]:
    """The current directory on the import path for the block, first, as `optuna-rq workers`
    (like `rq worker`) has it."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)
