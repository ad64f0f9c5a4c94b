"""optuna-rq workers: the side that runs objectives.

`optuna-rq workers --import MODULE` is how they are started; these are the pieces it uses.

They are imported when first asked for (PEP 562): the command line reads the light modules
beside them (`pool_health`, `isolation`) for its defaults and help, without RQ.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from optuna_rq.errors import RemoteTrialError
    from optuna_rq.workers.pool import WorkerPool, WorkerSettings
    from optuna_rq.workers.remote_trial import RemoteTrial
    from optuna_rq.workers.rq_worker import TrialWorker
    from optuna_rq.workers.runner import run_trial

__all__ = [
    "RemoteTrial",
    "RemoteTrialError",
    "TrialWorker",
    "WorkerPool",
    "WorkerSettings",
    "run_trial",
]

_HOME = {
    "RemoteTrial": "optuna_rq.workers.remote_trial",
    "RemoteTrialError": "optuna_rq.errors",
    "TrialWorker": "optuna_rq.workers.rq_worker",
    "WorkerPool": "optuna_rq.workers.pool",
    "WorkerSettings": "optuna_rq.workers.pool",
    "run_trial": "optuna_rq.workers.runner",
}


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
