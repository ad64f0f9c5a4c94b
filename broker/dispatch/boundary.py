"""The fault boundary of a study: whatever the broker does for one study, it does under
`FaultBoundary.guard(study, site)`, and an exception raised there is that study's alone.

The guard logs the exception once, with its traceback, and records it as the study's fault (its
first); the study then takes no further part in the turn, and the daemon ends it FAILED, naming
the site and the error in its status. The process and every other study go on.

Not a study's fault, and passed through to the loop (`passes_through`):
- Redis unreachable, loading, read-only (a failover) or out of memory: the whole broker waits;
  nothing one study did caused it, and failing the study would lose its trials for a blink;
- the broker losing its lock or its Redis's data (`BrokerAlreadyRunningError`,
  `RedisDataLostError`): the whole broker stops;
- a study storage failing (`StudyStorageError`): every study on that storage fails, which the
  daemon does, not only the one that found out;
- BaseException (KeyboardInterrupt, SystemExit): the process is being stopped.

Everything else, a bug in our code or in Optuna, a storage that rejects a value, a sampler that
raises, fails the one study at once: retrying a deterministic error only spends the budget.

Every site is a failpoint (`<site>@<study>`, `optuna_rq.plumbing.failpoints`), so the fault tests
raise at each of them, and a new site is one they cover by its existence.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import redis

from optuna_rq.errors import BrokerAlreadyRunningError, RedisDataLostError, StudyStorageError
from optuna_rq.plumbing import failpoints

__all__ = ["FaultBoundary", "Site", "StudyFault", "passes_through"]

log = logging.getLogger("optuna_rq.broker")


class Site(enum.Enum):
    """Where the broker acts for one study."""

    START = "start"  # open its storage, load or create the study, take over its trials in flight
    ASK = "ask"  # sample a trial (study.ask(), or the sampler process's answer) and process()
    SEND = "send"  # put a trial's job in the turn's batch
    TELL = "tell"  # tell a result, or a lost attempt and its retry
    CALL = "call"  # answer a remote trial's call
    LEASES = "leases"  # find its attempts whose workers are lost
    WITHDRAW = "withdraw"  # withdraw its queued jobs, mark its running ones cancelled
    STOP = "stop"  # check its stop conditions (--timeout, --target, --patience)
    STATUS = "status"  # summarise it for `status`, `wait` and the front doors
    METRICS = "metrics"  # its gauges
    COMMAND = "command"  # apply a command to it (submit, cancel, set, enqueue, delete)
    END = "end"  # end it: finished when its budget is recorded, or cancelled


_REDIS_OUTAGES = (
    redis.ConnectionError,  # BusyLoadingError too
    redis.TimeoutError,
    redis.exceptions.OutOfMemoryError,
    redis.exceptions.ReadOnlyError,
)
_BROKER_FAULTS = (BrokerAlreadyRunningError, RedisDataLostError, StudyStorageError)


def passes_through(error: BaseException) -> bool:
    """Whether `error` is the process's (or a storage's), not one study's: see the module."""
    if isinstance(error, _REDIS_OUTAGES + _BROKER_FAULTS) or not isinstance(error, Exception):
        return True
    # A stream whose consumer group is gone: Redis lost its data, which the loop asks the epoch.
    return isinstance(error, redis.ResponseError) and str(error).startswith("NOGROUP")


@dataclass(frozen=True, slots=True)
class StudyFault:
    """What failed a study: the site, the error as its status shows it, and the exception."""

    site: Site
    error: str
    cause: Exception

    def __str__(self) -> str:
        return f"{self.error} (while the broker did '{self.site.value}' for it)"


class FaultBoundary:
    """The studies that faulted (`faults`, name -> its first fault), until the daemon ends them."""

    def __init__(self) -> None:
        self.faults: dict[str, StudyFault] = {}

    def faulted(self, study: str) -> bool:
        return study in self.faults

    @contextmanager
    def guard(self, study: str, site: Site) -> Iterator[None]:
        """Run the block for `study` at `site`: an exception that is the study's own is
        recorded as its fault and goes no further (the code after the block runs on, so a loop
        over studies carries on with the next)."""
        try:
            yield
            if failpoints.armed():  # as if the block's last statement raised: its work is done
                failpoints.hit(f"{site.value}@{study}")
        except Exception as exc:
            if passes_through(exc):
                raise
            self.record(study, site, exc)

    def record(self, study: str, site: Site, error: Exception) -> None:
        """Make `error` the study's fault (if it has none yet), logged once with its traceback."""
        if study in self.faults:
            return
        fault = StudyFault(site, f"{type(error).__name__}: {error}", error)
        self.faults[study] = fault
        log.error("study %r failed at %s: %s", study, site.value, fault.error, exc_info=error)

    def forget(self, study: str) -> None:
        """The study ended (or started anew): its fault is reported."""
        self.faults.pop(study, None)
