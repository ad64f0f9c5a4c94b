"""optuna-rq: an ask/tell Optuna trial broker over Redis queues.

The public API is flytekitplugins.optuna's, unchanged: `Optimizer`, `optimize`, `suggest`,
the suggestion classes and `process`.
"""

from broker.errors import ConfigError, OptunaRQError
from broker.optimizer import Optimizer, optimize
from broker.space import Category, Float, Integer, Number, Suggestion, process, suggest

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
