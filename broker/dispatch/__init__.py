"""The dispatch loop and its collaborators: run studies on RQ workers with an exact cap.

`Dispatcher` is the loop (ask -> process -> enqueue; results -> tell -> acknowledge -> refill);
`StudyRun` is one study it runs. The modules behind them, one concept each:

    dispatcher  the loop
    refill      filling free slots: ask -> process -> enqueue, asking ahead
    endings     a study's trials in flight ended at once: wound down, cancelled, abandoned
    runs        StudyRun, and one record per trial in flight (asked ahead, unsent, sent)
    run_spec    RunSpec: what a run takes from its study's spec, frozen
    budget      Budget: the trials a run may ask, has asked, has had reported
    sending     the trial queue: sealed requests and their RQ jobs
    results     the result stream: reading it, acknowledging what was recorded
    calls       remote-trial calls, served on the real trial
    retries     lost attempts, and the trials that run them again
    leases      which attempts have lost their worker, judged by their leases
    observer    the hooks the metrics override, and the counters kept in Redis
    offloop     which studies sample in the sampler process (`optuna_rq.sampling`), and what
                the loop has asked of it
"""

from optuna_rq.dispatch.budget import Budget
from optuna_rq.dispatch.dispatcher import Dispatcher
from optuna_rq.dispatch.observer import DispatchObserver, count_refusal
from optuna_rq.dispatch.offloop import OffLoopSampling
from optuna_rq.dispatch.refill import ASK_BUDGET_S
from optuna_rq.dispatch.run_spec import RunSpec
from optuna_rq.dispatch.runs import ATTEMPT_ATTR, RETRY_OF_ATTR, StudyRun
from optuna_rq.dispatch.sending import FINISHED_JOB_TTL_S

__all__ = [
    "ASK_BUDGET_S",
    "ATTEMPT_ATTR",
    "FINISHED_JOB_TTL_S",
    "RETRY_OF_ATTR",
    "Budget",
    "DispatchObserver",
    "Dispatcher",
    "OffLoopSampling",
    "RunSpec",
    "StudyRun",
    "count_refusal",
]
