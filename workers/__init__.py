"""optuna-rq workers: the side that runs objectives.

`optuna-rq workers --import MODULE` is how they are started; these are the pieces it uses.
"""

from workers.pool import TrialWorker, WorkerPool, WorkerSettings, trial_queue
from workers.remote_trial import RemoteTrial, RemoteTrialError
from workers.runner import run_trial
from workers.serializer import MsgpackSerializer

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
