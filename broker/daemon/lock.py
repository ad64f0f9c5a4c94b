"""One broker per prefix, and a broker that never writes to a Redis that lost its data or to a
prefix another broker took over.

`BrokerLock` is the prefix's broker lock: taken at start (at once from a broker that died on this
machine), renewed every third of its TTL. It owns the broker's fenced client (`fence`): every
write the broker makes is conditional, atomically, on the lock still naming it and on the epoch,
so a broker frozen past the TTL while another took over writes nothing when it wakes. A lock that
lapsed while nobody took it (an outage longer than the TTL) is taken again by the first write.
`EpochGuard` is the random token the first broker sets in Redis: if it is gone or different, the
server lost what the broker wrote (a restart without persistence, a flush, a failover to an empty
replica), and the broker must stop rather than write on.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from datetime import datetime, timezone
from typing import Any

import redis

from optuna_rq.daemon.fence import Fence, FencedRedis, data_lost_error
from optuna_rq.errors import BrokerAlreadyRunningError, FenceLostError, RedisDataLostError
from optuna_rq.plumbing.processes import exited
from optuna_rq.protocol import Keys

__all__ = ["BrokerLock", "EpochGuard"]

log = logging.getLogger("optuna_rq.broker")


def _died_here(holder: str) -> bool:
    """True if the lock's `holder` ("host:pid since ...") ran on this host and is gone: its pid
    is not running, or is our own (a restarted container reuses pid 1)."""
    where = holder.split(" ", 1)[0]
    host, _, pid_text = where.rpartition(":")
    if host != socket.gethostname() or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    return pid == os.getpid() or exited(pid)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class BrokerLock:
    """The lock at `Keys.broker`, holding this process's identity ("host:pid since ..."), and the
    fenced client (`connection`) every write of the broker goes through."""

    def __init__(self, connection: redis.Redis, keys: Keys, *, ttl_s: float) -> None:
        self.keys = keys
        self.ttl_s = ttl_s
        self.identity = f"{socket.gethostname()}:{os.getpid()} since {_now()}"
        self.fence = Fence(
            lock=keys.broker,
            epoch_key=keys.epoch,
            generation_key=f"{keys.broker}:generation",
            token=self.identity.encode(),
            ttl_ms=max(1, round(ttl_s * 1000)),
        )
        self.connection = FencedRedis.around(connection, self.fence)
        self._last_renewed = 0.0

    def acquire(self) -> None:
        """Become the prefix's broker (setting the epoch if Redis has none), or raise naming the
        one that is."""
        holder = self.try_acquire()
        if holder is not None:
            raise BrokerAlreadyRunningError(
                f"a broker is already running on prefix {self.keys.prefix!r}: {holder}; "
                "stop it first, use another --prefix, or start this one with --standby to take "
                "over when it stops"
            )

    def try_acquire(self) -> str | None:
        """Take the lock if it is free, arming the fence (and setting the epoch if Redis has
        none); else the identity of the broker that holds it. A lock left by a broker that died
        on this machine (its pid is gone, or is ours: a restarted container) is taken over at
        once rather than after its TTL. Writes nothing while another broker holds the lock."""
        epoch = secrets.token_hex(8)
        holder = self.connection.acquire(epoch=epoch)
        if holder is not None:
            name = holder.decode(errors="replace")
            if not _died_here(name):
                return name
            holder = self.connection.acquire(epoch=epoch, take_over=name)
            if holder is not None:  # another broker took it first
                return holder.decode(errors="replace")
            log.warning("took over the lock of a broker that died here: %s", name)
        self._last_renewed = time.monotonic()
        return None

    def remaining_s(self) -> float | None:
        """Seconds until the lock expires unless its holder renews it; None if nobody holds it."""
        left_ms: Any = self.connection.pttl(self.keys.broker)
        return None if left_ms is None or left_ms < 0 else left_ms / 1000

    def keep(self, *, force: bool = False) -> None:
        """Renew the lock (at most every third of its TTL unless `force`), taking it again if it
        lapsed and nobody took it meanwhile. Raises FenceLostError if another broker took it,
        RedisDataLostError if the epoch is gone."""
        now = time.monotonic()
        if not force and now - self._last_renewed <= self.ttl_s / 3:
            return
        self.connection.pexpire(self.keys.broker, self.fence.ttl_ms)
        self._last_renewed = now

    def check(self) -> None:
        """Raise unless this broker still holds the lock and the epoch (one round trip, unless
        a fenced command proved both earlier in the loop's turn): run before anything is made
        durable in a study storage."""
        self.connection.check_fence()

    def fetch(self, pipe: redis.client.Pipeline) -> None:
        """Queue the read of the lock's holder on `pipe`, after the epoch's (`EpochGuard.fetch`);
        hand both replies to `proved`."""
        pipe.get(self.keys.broker)

    def proved(self, epoch: Any, holder: Any) -> None:
        """The epoch, then the lock, as read in one round trip: if both are this broker's, the
        fence held then, as a fence script would have proven (`FencedRedis.proving`). A flush
        or a takeover between the two reads leaves the lock not ours: nothing is proven."""
        if epoch == self.fence.epoch and holder == self.fence.token:
            self.connection.proven = self.connection.in_turn

    def release(self) -> None:
        """Let the lock go; a no-op if it is no longer ours."""
        try:
            self.connection.delete(self.keys.broker)
        except (FenceLostError, RedisDataLostError):
            pass


class EpochGuard:
    """The token at `Keys.epoch`: set by the first broker of a Redis when it takes the lock
    (`BrokerLock.acquire`), checked every step."""

    def __init__(self, connection: redis.Redis, keys: Keys, fence: Fence) -> None:
        self.connection = connection
        self.keys = keys
        self.fence = fence

    @property
    def epoch(self) -> bytes | None:
        return self.fence.epoch

    def establish(self) -> None:
        """Nothing more to do: the lock's acquisition set the epoch (unless a predecessor did)
        and learnt it."""
        assert self.fence.epoch is not None, "take the lock first"

    def fetch(self, pipe: redis.client.Pipeline) -> None:
        """Queue the read of the epoch on `pipe`; hand its reply to `check`."""
        pipe.get(self.keys.epoch)

    def check_now(self) -> None:
        """Raise RedisDataLostError unless Redis still holds our epoch."""
        self.check(self.connection.get(self.keys.epoch))

    def check(self, current: Any) -> None:
        """Raise RedisDataLostError unless `current` (the epoch as read) is ours."""
        if current != self.epoch:
            raise data_lost_error(self.keys.epoch, current)
