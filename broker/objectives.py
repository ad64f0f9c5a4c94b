"""Objective paths: the exact `package.module:function` strings that name what workers run.

The split is never guessed (unlike rq's `import_attribute`): the module is everything before the
one `:`, the function a plain public identifier after it, so no attribute path can reach through
a served module (`served:os.system` is refused).
"""

from __future__ import annotations

import re
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
