"""optuna-rq workers: the side that runs objectives.

`optuna-rq workers --import MODULE` is how they are started; these are the pieces it uses.
"""

from optuna_rq.workers.pool import TrialWorker, WorkerPool, WorkerSettings, trial_queue
from optuna_rq.workers.remote_trial import RemoteTrial, RemoteTrialError
from optuna_rq.workers.runner import run_trial
from optuna_rq.workers.serializer import MsgpackSerializer

__all__ = [
    "MsgpackSerializer",
    "RemoteTrial",
    "RemoteTrialError",
    "TrialWorker",
    "WorkerPool",
    "WorkerSettings",
    "run_trial",
    "trial_queue",
]
