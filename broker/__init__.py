"""optuna-rq: an ask/tell Optuna trial broker over Redis queues.

The public API is flytekitplugins.optuna's, unchanged: `Optimizer`, `optimize`, `suggest`,
the suggestion classes and `process`.
"""

from optuna_rq.errors import ConfigError, OptunaRQError
from optuna_rq.optimizer import Optimizer, optimize
from optuna_rq.space import Category, Float, Integer, Number, Suggestion, process, suggest

__all__ = [
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
