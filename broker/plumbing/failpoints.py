"""Failpoints: let the fault tests break the broker, or a worker, at an exact point, for real.

`OPTUNA_RQ_FAILPOINTS="after_ask=3"` makes the broker SIGKILL itself the 3rd time it passes
`hit("after_ask")`; `"before_tell=1:stall"` makes the thread that passes it the first time hang
there (as a storage call that never returns would), while the process and its other threads
live on; `"after_fence=2:stop"` makes the process SIGSTOP itself there (frozen whole, as a
paused VM or a debugger would freeze it, until a test sends SIGCONT); `"tell@mystudy=1:raise"`
raises FailpointError there, as a bug would. Unset (always, outside the fault tests), `hit` is
one dict lookup. Points:

    after_ask     a trial was asked (RUNNING in the storage) and not yet enqueued
    before_tell   a result was read from the stream and not yet recorded (`tell`)
    after_tell    a trial's result was recorded (in memory) and its journal not yet flushed
    after_fence   the broker's fence was checked before a flush, or an SQL storage's write, and
                  nothing written yet
    after_flush   a journal was flushed and what it acknowledges not yet sent (the sends, the
                  acks, the replies or the status that follow)
    after_ledger  the ids of the commands taken were made durable (`daemon.ledger`), the inbox
                  not yet trimmed (nor a bulk command moved onto its backlog)
    after_take    a bulk command was moved onto its study's backlog, the inbox trimmed up to it
    after_slice   a slice of a bulk command was applied and flushed, its cursor not yet moved
    worker_stopped  a pool's worker process left RQ's work loop (told to stop) and has not
                  yet exited
    pool_turn     a pool's supervising loop completed a turn and has not yet reported it to
                  its liveness probe (`optuna_rq.workers.pool_health`)
    <site>@<study>  the broker does something for one study at a site of its fault boundary
                  (`optuna_rq.dispatch.boundary.Site`: ask, tell, status, ...)
"""

from __future__ import annotations

import os
import signal
import time

__all__ = ["ENV_FAILPOINTS", "FailpointError", "armed", "hit"]

ENV_FAILPOINTS = "OPTUNA_RQ_FAILPOINTS"

_ACTIONS = ("kill", "stall", "stop", "raise")
_STALL_S = 3600.0  # long enough for any test to see it; bounded, should its process be missed


def _parse(text: str) -> dict[str, tuple[int, str]]:
    points: dict[str, tuple[int, str]] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, rest = item.partition("=")
        count, _, action = rest.partition(":")
        action = action or "kill"
        if action not in _ACTIONS:
            raise ValueError(f"{ENV_FAILPOINTS}: {item!r}: the action is one of {_ACTIONS}")
        points[name] = (int(count or "1"), action)
    return points


_armed = _parse(os.environ.get(ENV_FAILPOINTS, ""))


class FailpointError(RuntimeError):
    """Raised at an armed failpoint whose action is `raise`: a bug, as far as the code knows."""


def armed() -> bool:
    """Whether any failpoint is armed: callers that build a point's name skip it if not."""
    return bool(_armed)


def hit(name: str) -> None:
    """Count a pass through failpoint `name`; on the armed pass, act (see the module)."""
    if name not in _armed:
        return
    count, action = _armed[name]
    _armed[name] = (count - 1, action)
    if count - 1 > 0:
        return
    if action == "stall":
        del _armed[name]  # hang once: a test that lets it go finds it passable again
        time.sleep(_STALL_S)
    elif action == "stop":
        del _armed[name]
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "raise":
        del _armed[name]
        raise FailpointError(f"failpoint {name}")
    else:
        os.kill(os.getpid(), signal.SIGKILL)
