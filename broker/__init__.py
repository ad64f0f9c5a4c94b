"""optuna-rq: an ask/tell Optuna trial broker over Redis queues.

The public API is flytekitplugins.optuna's, unchanged: `Optimizer`, `optimize`, `suggest`,
the suggestion classes and `process`; and `BrokerClient`, to submit, change, cancel and follow
studies on a broker daemon from a script.

Each name is imported when first asked for (PEP 562), not with the package: every module of
the package imports this one first, and the command line and the protocol need neither Optuna
nor Redis to start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna_rq.client import BrokerClient
    from optuna_rq.errors import ConfigError, OptunaRQError
    from optuna_rq.optimizer import Optimizer, optimize
    from optuna_rq.space.declarations import (
        Category,
        Float,
        Integer,
        Number,
        Suggestion,
        process,
        suggest,
    )

__all__ = [
    "BrokerClient",
    "Category",
    "ConfigError",
    "Float",
    "Integer",
    "Number",
    "OptunaRQError",
    "Optimizer",
    "Suggestion",
    "optimize",
    "process",
    "suggest",
]

_HOME = {
    "BrokerClient": "optuna_rq.client",
    "ConfigError": "optuna_rq.errors",
    "OptunaRQError": "optuna_rq.errors",
    "Optimizer": "optuna_rq.optimizer",
    "optimize": "optuna_rq.optimizer",
    "Category": "optuna_rq.space.declarations",
    "Float": "optuna_rq.space.declarations",
    "Integer": "optuna_rq.space.declarations",
    "Number": "optuna_rq.space.declarations",
    "Suggestion": "optuna_rq.space.declarations",
    "process": "optuna_rq.space.declarations",
    "suggest": "optuna_rq.space.declarations",
}
"""The module each public name lives in."""


def __getattr__(name: str) -> Any:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # asked once: the next lookup finds it without this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
