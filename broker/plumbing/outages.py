"""How a process lives through a Redis outage: one backoff, and one account per process.

Every retry of Redis, in every process (the broker, a pool's parent, its worker children, the
sampling process), waits `backoff()`'s delays: exponential and jittered (redis-py's
`ExponentialWithJitterBackoff`: the delay after the nth failure is drawn uniformly between 0 and
`min(cap, base * 2**n)`), so a fleet that lost Redis together does not come back in lockstep.

What a process logs about it goes through its `Outage` (`outage_of(connection)`): one line when
Redis goes away, one when it is back (`Redis at <url> is back after 19m02s (571 retries)`), and
a count of the failed tries in between, not a line per retry, whichever of the process's loops
(heartbeat, leases, RQ's dequeue, a result's delivery) met the failure. A process that stops
while Redis is away logs that once (`stopping`), with what it could not do.
"""

from __future__ import annotations

import logging
import os
import threading
import time

import redis
from redis.backoff import AbstractBackoff, ExponentialWithJitterBackoff

__all__ = [
    "UNREACHABLE",
    "Outage",
    "backoff",
    "describe_duration",
    "name_server",
    "outage_of",
]

UNREACHABLE = (redis.ConnectionError, redis.TimeoutError)
"""The errors that mean Redis cannot be reached (BusyLoadingError, a Redis still loading its
data, is a ConnectionError): what an `Outage` counts."""

_logger = logging.getLogger("optuna_rq.redis")


def backoff(*, base_s: float, cap_s: float) -> AbstractBackoff:
    """The delays between retries of Redis: `compute(n)` after the nth failure in a row is drawn
    from [0, min(cap_s, base_s * 2**n)], afresh for every call (full jitter)."""
    return ExponentialWithJitterBackoff(cap=cap_s, base=base_s)


def describe_duration(seconds: float) -> str:
    """`42.0s`, `19m02s`, `2h05m09s`: how long an outage lasted, as a person reads it."""
    if seconds < 60:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


class Outage:
    """One process's account of the Redis at `where` being unreachable. Thread-safe: a pool's
    parent, a worker and its lease thread may meet the same outage at once."""

    def __init__(self, where: str) -> None:
        self.where = where
        self._lock = threading.Lock()
        self._since: float | None = None  # time.monotonic() of the first failure
        self._retries = 0  # failed tries after the first

    @property
    def down(self) -> bool:
        """Whether the last try of this process failed to reach Redis."""
        return self._since is not None

    @property
    def retries(self) -> int:
        return self._retries

    def lasted_s(self) -> float:
        """How long Redis has been unreachable (0 if it is not)."""
        since = self._since
        return 0.0 if since is None else time.monotonic() - since

    def failed(self, error: BaseException) -> bool:
        """A try failed to reach Redis with `error`: the first of an outage logs one line, the
        others are counted. True if this one started the outage."""
        with self._lock:
            if self._since is not None:
                self._retries += 1
                return False
            self._since = time.monotonic()
            self._retries = 0
        _logger.warning(
            "Redis at %s is unreachable (%s): retrying with backoff, quietly until it is back",
            self.where,
            error,
        )
        return True

    def recovered(self) -> float | None:
        """A try reached Redis: if it was away, log that it is back (for how long, after how many
        retries) and return how long it was away; None if it was not away."""
        with self._lock:
            since, retries = self._since, self._retries
            if since is None:
                return None
            self._since = None
            self._retries = 0
        lasted = time.monotonic() - since
        _logger.warning(
            "Redis at %s is back after %s (%d %s)",
            self.where,
            describe_duration(lasted),
            retries,
            "retry" if retries == 1 else "retries",
        )
        return lasted

    def stopping(self, could_not: str) -> None:
        """The process stops while Redis is away: one line saying what it `could_not` do."""
        _logger.warning(
            "stopping while Redis at %s is unreachable (for %s, %d retries): %s",
            self.where,
            describe_duration(self.lasted_s()),
            self._retries,
            could_not,
        )


# -- one per process and server --------------------------------------------------------------

_names: dict[tuple[object, ...], str] = {}  # server -> how its lines name it
_outages: dict[tuple[object, ...], Outage] = {}
_outages_lock = threading.Lock()


def _server(client: redis.Redis) -> tuple[object, ...]:
    """The server `client` talks to, as its pool's settings give it (any client of it, the
    broker's fenced one included, with a pool of its own or not). Behind Sentinel the server is
    whichever primary the sentinels name, so the service stands for it."""
    service = getattr(client.connection_pool, "service_name", None)
    if isinstance(service, str):
        return ("sentinel", service)
    kwargs = client.connection_pool.connection_kwargs
    if kwargs.get("path"):
        return ("unix", kwargs["path"])
    return (kwargs.get("host", "localhost"), kwargs.get("port", 6379))


def name_server(client: redis.Redis, redacted_url: str) -> None:
    """Name the server `client` talks to, as outage lines show it (a URL without its password:
    `locations.redact_url`)."""
    _names.setdefault(_server(client), redacted_url)


def outage_of(client: redis.Redis) -> Outage:
    """This process's `Outage` of the server `client` talks to (one per server, however many
    clients reach it)."""
    server = _server(client)
    with _outages_lock:
        outage = _outages.get(server)
        if outage is None:
            if server[0] in ("unix", "sentinel"):
                where = _names.get(server, f"{server[0]}://{server[1]}")
            else:
                where = _names.get(server, f"{server[0]}:{server[1]}")
            outage = _outages[server] = Outage(where)
        return outage


def _forget_after_fork() -> None:
    """A forked process (RQ's work horse) keeps its own account, from nothing: its parent's
    outage is its parent's to end, and a lock held by another thread at the fork is not."""
    global _outages_lock
    _outages.clear()
    _outages_lock = threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
