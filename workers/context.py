"""What a worker process was started with, installed once, read by every trial it runs.

RQ calls the job function by its dotted path (`optuna_rq.protocol.RUN_TRIAL`) with nothing but
the payload, so what the process was started to do (the modules it serves, its signing secret,
its supervising parent, its metrics) cannot be passed in: the process installs one frozen
`WorkerContext` before it takes jobs, and `run_trial` reads it with `current()`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from optuna_rq.protocol import DEFAULT_LEASE_TTL_S, Signer
from optuna_rq.workers.child_messages import ChildChannel
from optuna_rq.workers.worker_metrics import WorkerMetrics

__all__ = ["WorkerContext", "current", "install"]


@dataclass(frozen=True, kw_only=True)
class WorkerContext:
    """The worker process's configuration; the defaults are those of an RQ worker started by
    hand on our queue: it serves nothing, so it refuses every trial."""

    served: frozenset[str] = frozenset()  # modules whose objectives may run (`loader.serve`)
    signer: Signer = field(default_factory=Signer)  # opens requests, seals results
    # The supervising parent, which this process informs when attempts start and end; without
    # one, a thread in this process renews the lease.
    channel: ChildChannel | None = None
    lease_ttl_s: float = DEFAULT_LEASE_TTL_S
    metrics: WorkerMetrics | None = None
    # Set once the process is told to stop (its worker's warm shutdown): a result Redis cannot
    # take then is given up on, and logged, rather than held until Redis is back.
    stopping: threading.Event = field(default_factory=threading.Event)


_UNSET = WorkerContext()
_installed: WorkerContext | None = None


def install(context: WorkerContext) -> None:
    """Make `context` this process's, for good. Raises RuntimeError if one is installed already:
    a process is started for one purpose, and a second install would be a bug."""
    global _installed
    if _installed is not None:
        raise RuntimeError("a WorkerContext is already installed in this process")
    _installed = context


def current() -> WorkerContext:
    """The installed context, or the defaults (serving nothing) if none was installed."""
    return _UNSET if _installed is None else _installed
