"""The objective contract: how an objective is named, what it must return, how its error travels.

Paths are the exact `package.module:function` strings that name what workers run. The split is
never guessed (unlike rq's `import_attribute`): the module is everything before the one `:`, the
function a plain public identifier after it, so no attribute path can reach through a served
module (`served:os.system` is refused).

`judge_return` is shared by the in-process Optimizer and the workers, so a return value is judged
the same way wherever the objective ran; `inputs_mismatch` by the front doors and the workers, so
an objective is held to its space the same way wherever it imports.
"""

from __future__ import annotations

import inspect
import math
import re
import traceback
from collections.abc import Iterable
from typing import Any

from optuna_rq.errors import ConfigError

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_FUNCTION = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def parse_objective_path(spec: str) -> tuple[str, str]:
    """Split `"package.module:function"` into its module and function, or raise ConfigError."""
    if not isinstance(spec, str):
        raise ConfigError(f"objective path must be a 'module:function' string, got {spec!r}")
    module, sep, function = spec.partition(":")
    if not sep:
        raise ConfigError(
            f"objective path {spec!r} has no ':': write it as 'package.module:function'"
        )
    if not _MODULE.fullmatch(module):
        raise ConfigError(
            f"objective path {spec!r}: {module!r} is not a dotted module name "
            "(write 'package.module:function')"
        )
    if not _FUNCTION.fullmatch(function):
        raise ConfigError(
            f"objective path {spec!r}: {function!r} is not a public function name "
            "(a plain identifier, no dots, not starting with '_')"
        )
    return module, function


def objective_path_of(obj: Any) -> str:
    """The `module:function` path of a top-level function or flytekit task, for workers to import.

    Raises ConfigError when workers could not import it by that path (a lambda, a nested
    function, something defined in `__main__`).
    """
    function = getattr(obj, "task_function", obj)  # a flytekit task wraps its function
    module = getattr(function, "__module__", None)
    qualname = getattr(function, "__qualname__", None)
    if not isinstance(module, str) or not isinstance(qualname, str):
        raise ConfigError(
            f"cannot derive a 'module:function' path from {obj!r}: pass the path as a string"
        )
    if module == "__main__" or "<" in qualname or "." in qualname:
        raise ConfigError(
            f"{module}:{qualname} cannot be imported by workers: define the objective at the "
            "top level of an importable module and pass 'package.module:function'"
        )
    spec = f"{module}:{qualname}"
    parse_objective_path(spec)
    return spec


TRIAL_PARAMETER = "trial"
"""The parameter that makes an objective define-by-run: it is given the (remote) trial."""

_NAMED = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def inputs_mismatch(objective: Any, inputs: Iterable[str]) -> str | None:
    """Why `objective` cannot be called as a trial calls it, `objective(**inputs)` (and
    `trial=...` if it has a `trial` parameter), with `inputs` the space's top-level names: the
    names it requires that the space lacks, and those the space gives that it does not take
    (none with `**kwargs`). None if the call binds, or if its signature cannot be read (a
    builtin): then the call itself says.

    A definition error: the same for every trial, so it fails the study at once.
    """
    function = getattr(objective, "task_function", objective)  # a flytekit task's function
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    parameters = signature.parameters
    given = set(inputs)
    if TRIAL_PARAMETER in parameters:
        given.add(TRIAL_PARAMETER)
    try:
        signature.bind(**dict.fromkeys(given))
        return None
    except TypeError as exc:
        bind_error = str(exc)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    named = {name for name, p in parameters.items() if p.kind in _NAMED}
    missing = [
        name
        for name, p in parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
        and (name not in given or p.kind is inspect.Parameter.POSITIONAL_ONLY)
    ]
    unexpected = [] if takes_any else sorted(given - named)
    name = getattr(function, "__qualname__", None) or repr(objective)
    problems = []
    if missing:
        problems.append(
            f"it requires {_names(missing)}, which the space does not give (add "
            f"{'it' if len(missing) == 1 else 'them'} to the space, or give "
            f"{'it' if len(missing) == 1 else 'them'} a default)"
        )
    if unexpected:
        problems.append(
            f"the space gives {_names(unexpected)}, which it does not take (remove "
            f"{'it' if len(unexpected) == 1 else 'them'} from the space, or add "
            f"{'the parameter' if len(unexpected) == 1 else 'the parameters'} or **kwargs)"
        )
    if not problems:  # e.g. a positional-only parameter given by name: Python's own words
        problems.append(bind_error)
    shown = ", ".join(
        str(p.replace(annotation=inspect.Parameter.empty)) for p in parameters.values()
    )
    return f"{name}({shown}) cannot take the space's inputs: {'; '.join(problems)}"


def _names(names: Iterable[str]) -> str:
    return ", ".join(repr(name) for name in names)


MAX_ERROR_CHARS = 4000
"""The error text a failed trial carries: its end, where the exception line is."""


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


def describe_exception(exc: BaseException) -> str:
    """The error text stored on a failed trial: the exception line, then the traceback."""
    text = "".join(traceback.format_exception(exc))
    return text[-MAX_ERROR_CHARS:]


def error_headline(error: str | None) -> str:
    """The line of a trial's error text to show first: its last non-empty one (a traceback ends
    with the exception, "ValueError: ..."); "" for none."""
    lines = (error or "").strip().splitlines()
    return lines[-1].strip() if lines else ""
