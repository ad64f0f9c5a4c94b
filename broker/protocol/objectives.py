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
from collections.abc import Iterable, Sequence
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
    builtin): then the call itself raises, naming the mismatch.

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
    """Check an objective's return as `study.tell` takes it: (values, None) when valid, (values
    or None, why) when not, `why` in Optuna's words (`optuna/study/_tell.py`).

    A sequence (a tuple or list) holds one value per objective; anything else is the one value.
    A value is whatever `float()` takes: a float or int (a bool too), a numpy scalar, a 0-d
    array, a one-element tensor. Infinities are values. NaN values come back with a reason, so
    the caller records why the trial failed. A string is no value: Optuna would take it for a
    sequence of characters, and fail or raise on it.
    """
    if isinstance(result, Sequence) and not isinstance(result, (str, bytes, bytearray)):
        items = list(result)
    else:
        items = [result]
    floats = [_as_float(item) for item in items]
    errors = [
        f"The value {_shown(item)} could not be cast to float"
        for item, value in zip(items, floats, strict=True)
        if value is None
    ]
    nans = [v for v in floats if v is not None and math.isnan(v)]
    errors += [f"The value {v} is not acceptable" for v in nans]
    if not errors and len(floats) != n_objectives:
        errors.append(
            f"The number of the values {len(floats)} did not match the number of the "
            f"objectives {n_objectives}"
        )
    values = [v for v in floats if v is not None]
    if not errors:
        return values, None
    why = f"objective returned {_shown(result)} ({type(result).__name__}): {'; '.join(errors)}"
    if len(values) == len(floats) == n_objectives:  # NaN alone: reported, Optuna records the FAIL
        return values, why
    expected = "a float" if n_objectives == 1 else f"a tuple of {n_objectives} floats"
    return None, f"{why}; expected {expected}, one per direction of the study"


def _as_float(value: object) -> float | None:
    """`float(value)`, or None if it takes none; a string never does here."""
    if isinstance(value, (str, bytes, bytearray)):
        return None
    try:
        return float(value)  # type: ignore[arg-type]  # whatever has __float__ or __index__
    except Exception:  # TypeError, ValueError, OverflowError (an int beyond a double), or
        return None  # whatever a tensor's __float__ raises: a FAIL, never a crash


_SHOWN_CHARS = 200


def _shown(value: object) -> str:
    """`repr(value)`, cut short: a returned array or model may print for pages."""
    try:
        text = repr(value)
    except Exception:  # a repr that raises must not hide what the objective returned
        text = f"<{type(value).__name__} object>"
    return text if len(text) <= _SHOWN_CHARS else f"{text[:_SHOWN_CHARS]}..."


def describe_exception(exc: BaseException) -> str:
    """The error text stored on a failed trial: the traceback, then the exception line. One
    that is no `Exception` (`SystemExit` from argparse or `sys.exit`, `KeyboardInterrupt`) is
    named once more, last, as `repr` shows it: "SystemExit(2) raised in the objective"."""
    text = "".join(traceback.format_exception(exc))
    if not isinstance(exc, Exception):
        text += f"{exc!r} raised in the objective\n"
    return text[-MAX_ERROR_CHARS:]


def error_headline(error: str | None) -> str:
    """The line of a trial's error text to show first: its last non-empty one (a traceback ends
    with the exception, "ValueError: ..."); "" for none."""
    lines = (error or "").strip().splitlines()
    return lines[-1].strip() if lines else ""
