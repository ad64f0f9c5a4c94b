"""Delivering a trial's result: the one write a worker must never lose.

A result may have cost hours of compute, so `deliver` keeps it until Redis takes it: through an
outage (`wait_for_redis`) and through a full Redis (`wait_for_memory`: a Redis at `maxmemory`
with `noeviction` refuses the XADD). While it holds an undelivered result it keeps the attempt's
lease alive with PEXPIRE, which a full Redis still serves, so the broker does not count the
attempt lost; it logs once that Redis is full, not once per retry. Only a process that is
stopping (`stop`) gives up on a Redis still away: the caller logs which result it could not
deliver, and the broker runs that trial again once its lease lapses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.plumbing.redis_waits import is_full, wait_for_memory, wait_for_redis
from optuna_rq.protocol import RESULT_FIELD

__all__ = ["deliver", "keep_lease"]

log = logging.getLogger("optuna_rq.worker")

MAX_BACKOFF_S = 10.0
"""The longest wait between two tries, when the lease does not bound it lower."""


def keep_lease(connection: redis.Redis, lease: str, ttl_ms: int) -> bool:
    """Extend a lease that is still there (PEXPIRE: served by a full Redis too, where SET is
    refused); True if it was there."""
    try:
        return bool(connection.pexpire(lease, ttl_ms))
    except redis.RedisError:
        return False


def deliver(
    connection: redis.Redis,
    reply_to: str,
    sealed_result: bytes,
    lease: str | None,
    *,
    lease_ttl_s: float | None = None,
    what: str = "a trial",
    beat: Callable[[], None] | None = None,
    stop: threading.Event | None = None,
) -> bool:
    """Append a sealed `TrialResult` to the broker's stream and drop the lease, waiting out a
    Redis outage or a full Redis for as long as it takes. The lease is dropped in the same
    MULTI/EXEC as the result goes in: never one without the other (a full Redis refuses the
    XADD but would take the DEL), so a broker that sees the lease gone finds the result.

    While it waits for room it renews `lease` every quarter of `lease_ttl_s` (given: the caller
    has nobody else renewing it) and calls `beat` at least every second (a pool's parent renews
    its other children's leases there). The wait between tries doubles, jittered, up to a
    quarter of the lease TTL. A retry after a reply lost in transit may append the result
    twice; the broker tells the first and drops the second as stale.

    Returns True once delivered; False if `stop` was set while Redis could not take it (the
    process is stopping: the caller logs what was not delivered).
    """
    cap_s = MAX_BACKOFF_S if lease_ttl_s is None else min(MAX_BACKOFF_S, lease_ttl_s / 4)
    full_since: float | None = None
    renewed = time.monotonic()

    def keep_alive() -> None:
        nonlocal renewed
        if beat is not None:
            beat()
        if lease is not None and lease_ttl_s is not None:
            if time.monotonic() - renewed >= lease_ttl_s / 4:
                keep_lease(connection, lease, int(lease_ttl_s * 1000))
                renewed = time.monotonic()

    while True:
        if stop is not None and stop.is_set() and outage_of(connection).down:
            return False  # stopping: nothing more is sent to a Redis known to be away
        try:
            pipe = connection.pipeline(transaction=True)
            pipe.xadd(reply_to, {RESULT_FIELD: sealed_result})
            if lease is not None:
                pipe.delete(lease)
            pipe.execute()
            outage_of(connection).recovered()
            break
        except UNREACHABLE as exc:
            waited = wait_for_redis(
                connection, exc, max_backoff_s=cap_s, beat=keep_alive, stop=stop
            )
            if waited is None:
                return False
        except redis.ResponseError as exc:
            if not is_full(exc):
                raise
            logged = full_since is not None  # logged once per result, not once per try
            full_since = full_since or time.monotonic()
            waited = wait_for_memory(
                connection,
                exc,
                max_backoff_s=cap_s,
                beat=keep_alive,
                what=f"holding the result of {what} until it has room",
                quiet=logged,
                stop=stop,
            )
            if waited is None:
                return False
    if full_since is not None:
        log.warning(
            "delivered the result of %s, held %.1fs while Redis was full",
            what,
            time.monotonic() - full_since,
        )
    return True
