"""The allow-list: which objectives a worker may run, decided before anything is imported.

A worker is started to serve some modules (`optuna-rq workers --import MODULE`). A request's
objective must be an exact `module:function` (never a guessed split) naming one of those
modules, and a public function defined in that module: not a name it imported, so
`mymodule:os.system` or `mymodule:system` after `from os import system` never run.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any

from optuna_rq.errors import ConfigError, ObjectiveLoadError, ObjectiveRefusedError
from optuna_rq.protocol import parse_objective_path

__all__ = ["load_objective", "serve"]


def serve(modules: Iterable[str]) -> frozenset[str]:
    """Import `modules` now and return them as the allow-list (`WorkerContext.served`).

    Raises ObjectiveLoadError naming the module, with the real ImportError chained, so a worker
    that cannot serve what it was asked to stops at once rather than failing every trial.
    """
    names = list(modules)
    for name in names:
        try:
            parse_objective_path(f"{name}:f")
        except ConfigError as exc:
            raise ObjectiveLoadError(f"--import {name!r} is not a dotted module name") from exc
        try:
            importlib.import_module(name)
        except Exception as exc:
            raise ObjectiveLoadError(
                f"cannot import {name!r}: {type(exc).__name__}: {exc} "
                "(is it on PYTHONPATH, and does it import cleanly?)"
            ) from exc
    return frozenset(names)


def load_objective(spec: str, served: frozenset[str]) -> Callable[..., Any]:
    """The function `spec` names, if `served` allows it; the check runs before any import.

    Raises ObjectiveRefusedError for a spec the allow-list refuses (malformed, a module not
    served, a name not defined in its module), ObjectiveLoadError for one that fails to load.
    """
    try:
        module_name, function_name = parse_objective_path(spec)
    except ConfigError as exc:
        raise ObjectiveRefusedError(str(exc)) from exc
    if module_name not in served:
        raise ObjectiveRefusedError(
            f"objective {spec!r} is not served here: this worker serves "
            f"{sorted(served) or 'no modules'} (start it with --import {module_name})"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise ObjectiveLoadError(f"cannot import {module_name!r}: {exc}") from exc
    fn = getattr(module, function_name, None)
    if fn is None:
        raise ObjectiveLoadError(f"module {module_name!r} has no function {function_name!r}")
    # A flytekit task wraps the function it was defined from.
    defined_in = getattr(getattr(fn, "task_function", fn), "__module__", None)
    if defined_in != module_name or not callable(fn):
        raise ObjectiveRefusedError(
            f"{spec!r} is not a function defined in {module_name!r} "
            f"(it comes from {defined_in!r}): only objectives defined in a served module run"
        )
    return fn  # type: ignore[no-any-return]
