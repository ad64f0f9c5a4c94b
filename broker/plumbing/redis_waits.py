"""How a process waits out a Redis that cannot take its commands: unreachable (an outage),
full (at its `maxmemory`), or read-only (a replica after a failover).

Every wait backs off with `outages.backoff` (jittered, so the processes that met the trouble
together do not come back together), reports through the process's `Outage` (`outage_of`), calls
its caller's `beat` at least every second (waiting is being alive), and ends early when its `stop`
event is set. The caller then sends its command again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from redis.exceptions import OutOfMemoryError, ReadOnlyError, RedisError

from optuna_rq.errors import RedisUnavailableError
from optuna_rq.plumbing.outages import UNREACHABLE, backoff, outage_of

__all__ = [
    "check_memory_policy",
    "describe_full",
    "is_full",
    "wait_for_memory",
    "wait_for_redis",
]

# `wait_for_redis` PINGs after waits drawn below 0.5, 1, 2, 4 s, ... up to its cap.
OUTAGE_BASE_S = 0.25

_logger = logging.getLogger(__name__)


def wait_for_redis(
    conn: redis.Redis,
    error: Exception,
    *,
    stop: Any | None = None,
    max_backoff_s: float = 5.0,
    give_up_s: float | None = None,
    beat: Callable[[], None] | None = None,
) -> float | None:
    """Ride out an outage that surfaced as `error`: PING with a jittered exponential backoff
    (`outages.backoff`, up to `max_backoff_s`) until Redis answers; returns how long it took
    (seconds), or None if `stop` (a threading.Event) was set first. Raises RedisUnavailableError
    after `give_up_s`, if given. What it logs goes through the process's `Outage`: one line when
    Redis goes away, one when it is back, the retries counted in between. `beat` is called at
    least every second while it waits: waiting is being alive (the broker's liveness probe).
    A full Redis (`error` an OutOfMemoryError) is waited out the same way (`wait_for_memory`),
    and a read-only one (a failover) until it is a primary again."""
    if isinstance(error, OutOfMemoryError):
        return wait_for_memory(
            conn, error, stop=stop, max_backoff_s=max_backoff_s, beat=beat, give_up_s=give_up_s
        )
    stop = stop or threading.Event()
    if isinstance(error, ReadOnlyError):
        return _wait_for_primary(conn, error, stop=stop, max_backoff_s=max_backoff_s, beat=beat)
    outage = outage_of(conn)
    outage.failed(error)
    delays = backoff(base_s=OUTAGE_BASE_S, cap_s=max_backoff_s)
    started = time.monotonic()
    failures = 0
    while True:
        failures += 1
        if _pause(stop, delays.compute(failures), beat):
            return None
        try:
            conn.ping()
        except UNREACHABLE as exc:
            outage.failed(exc)
            waited = time.monotonic() - started
            if give_up_s is not None and waited >= give_up_s:
                raise RedisUnavailableError(
                    f"Redis has been unreachable for {waited:.0f}s, giving up: {exc}"
                ) from exc
            continue
        outage.recovered()
        return time.monotonic() - started


# -- a full Redis ---------------------------------------------------------------------------
# With `maxmemory-policy noeviction` (the policy the design requires: README, deploy/), a Redis
# at its `maxmemory` refuses every command that may grow its data (SET, XADD, HSET, LMOVE, EVAL
# of a script that writes: OutOfMemoryError) and still serves reads, deletions, XACK, PEXPIRE.
# A refused command did nothing (a MULTI/EXEC is refused whole), so the writer keeps what it
# meant to write, waits until Redis has room, and writes it again.


MEMORY_POLL_CAP_S = 2.0


def is_full(error: BaseException) -> bool:
    """True if `error` is Redis refusing a write for want of memory."""
    return isinstance(error, OutOfMemoryError)


def _memory(conn: redis.Redis) -> tuple[int, int] | None:
    """(used_memory, maxmemory) from INFO, or None if INFO is not allowed (an ACL user without
    it) or does not say."""
    try:
        info: dict[str, Any] = conn.info("memory")
        return int(info["used_memory"]), int(info["maxmemory"])
    except (RedisError, KeyError, TypeError, ValueError):
        return None


def describe_full(conn: redis.Redis) -> str:
    """`Redis is out of memory (maxmemory N)`, N in bytes as INFO gives it, if allowed."""
    memory = _memory(conn)
    return f"Redis is out of memory (maxmemory {'?' if memory is None else memory[1]})"


def check_memory_policy(conn: redis.Redis) -> str | None:
    """Warn, and return the policy, if Redis would evict keys when full (its `maxmemory-policy`
    is not `noeviction`): an evicted lease, job or result is lost without a word, and the broker
    can only notice after the fact, if the epoch key goes too. None if it would not, or INFO
    cannot say (an ACL user without it)."""
    try:
        info: dict[str, Any] = conn.info("memory")
    except RedisError:
        return None
    policy = info.get("maxmemory_policy")
    if isinstance(policy, bytes):
        policy = policy.decode()
    if policy is None or policy == "noeviction":
        return None
    _logger.warning(
        "Redis's maxmemory-policy is %s: full, it evicts keys (a trial's lease, job or result, "
        "lost without a word). optuna-rq needs noeviction (it waits out a full Redis): "
        "CONFIG SET maxmemory-policy noeviction, and in redis.conf",
        policy,
    )
    return str(policy)


def _has_room(conn: redis.Redis) -> bool | None:
    """True if Redis would take a write now (used memory within maxmemory: the rule noeviction
    applies, less the buffers it does not count), False if not, None if INFO cannot say."""
    memory = _memory(conn)
    if memory is None:
        return None
    used, limit = memory
    return limit == 0 or used <= limit


def wait_for_memory(
    conn: redis.Redis,
    error: Exception,
    *,
    stop: Any | None = None,
    max_backoff_s: float = 5.0,
    beat: Callable[[], None] | None = None,
    what: str = "waiting",
    quiet: bool = False,
    give_up_s: float | None = None,
) -> float | None:
    """Wait out a Redis too full to take a write (`error`, an OutOfMemoryError): poll its memory
    with a jittered exponential backoff (`outages.backoff`: writers that met the limit
    together do not come back together) until it has room; returns how long it took (seconds),
    or None if `stop` was set. The caller then writes again, and calls this again if Redis is
    full again. Where INFO is not allowed, it waits one backoff step and returns: the caller's
    own write is the probe.

    Logs `Redis is out of memory (maxmemory N): <what>` once (nothing if `quiet`: a caller that
    logged it already), and once when it has room. `beat` is called at least every second.
    Raises RedisUnavailableError after `give_up_s`, if given."""
    stop = stop or threading.Event()
    started = time.monotonic()
    if not quiet:
        _logger.error("%s: %s (%s)", describe_full(conn), what, error)
    # INFO is cheap: polled at least every MEMORY_POLL_CAP_S, to go on soon after room frees
    delays = backoff(base_s=0.05, cap_s=min(max_backoff_s, MEMORY_POLL_CAP_S))
    failures = 0
    while True:
        failures += 1
        if _pause(stop, delays.compute(failures), beat):
            return None
        room = _has_room(conn)  # None if unreachable too: the caller's write says what to wait for
        waited = time.monotonic() - started
        if room is False:
            if give_up_s is not None and waited >= give_up_s:
                raise RedisUnavailableError(
                    f"{describe_full(conn)} for {waited:.0f}s, giving up: {error}"
                ) from error
            continue
        if room and not quiet:
            _logger.info("Redis has room again after %.1fs; carrying on", waited)
        return waited


def _wait_for_primary(
    conn: redis.Redis,
    error: Exception,
    *,
    stop: Any,
    max_backoff_s: float,
    beat: Callable[[], None] | None,
) -> float | None:
    """Wait out a server that became a read-only replica (a failover moved the primary, and the
    URL still names this server): it answers, and refuses every write, until it is a primary
    again or the URL is pointed at one. Returns how long it took, or None if `stop` was set."""
    started = time.monotonic()
    _logger.error("Redis is read-only (%s): waiting for it to be a primary again", error)
    outage = outage_of(conn)
    delays = backoff(base_s=OUTAGE_BASE_S, cap_s=max_backoff_s)
    failures = 0
    while True:
        failures += 1
        if _pause(stop, delays.compute(failures), beat):
            return None
        try:
            info: Any = conn.info("replication")
        except UNREACHABLE as exc:
            outage.failed(exc)  # on its way back: the next look
            continue
        outage.recovered()
        if info.get("role") == "master":
            _logger.info("Redis takes writes again; carrying on")
            return time.monotonic() - started


def _pause(stop: Any, seconds: float, beat: Callable[[], None] | None) -> bool:
    """Wait `seconds`, calling `beat` at least every second; True if `stop` was set."""
    if beat is None:
        return bool(stop.wait(seconds))
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if stop.wait(min(left, 1.0)):
            return True
        beat()
    return bool(stop.is_set())
