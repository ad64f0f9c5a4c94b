"""optuna-rq workers: the side that runs objectives.

`optuna-rq workers --import MODULE` is how they are started; these are the pieces it uses.
"""

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
