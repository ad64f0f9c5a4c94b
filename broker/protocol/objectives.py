"""The objective contract: how an objective is named, what it must return, how its error travels.

Paths are the exact `package.module:function` strings that name what workers run. The split is
never guessed (unlike rq's `import_attribute`): the module is everything before the one `:`, the
function a plain public identifier after it, so no attribute path can reach through a served
module (`served:os.system` is refused).

`judge_return` is shared by the in-process Optimizer and the workers, so a return value is judged
the same way wherever the objective ran.
"""

from __future__ import annotations

import math
import re
import traceback
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
