"""optuna-rq: an ask/tell Optuna trial broker over Redis queues.

The public API is flytekitplugins.optuna's, unchanged: `Optimizer`, `optimize`, `suggest`,
the suggestion classes and `process`; and `BrokerClient`, to submit, change, cancel and follow
studies on a broker daemon from a script.
"""

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
