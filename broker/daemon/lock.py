"""One broker per prefix, and a broker that never writes to a Redis that lost its data.

`BrokerLock` is the prefix's broker lock: taken at start (at once from a broker that died on this
machine), renewed every third of its TTL, taken again after an outage longer than the TTL.
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

from optuna_rq.client import BrokerClient
from optuna_rq.errors import BrokerAlreadyRunningError, RedisDataLostError
from optuna_rq.processes import exited
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
    """The lock at `Keys.broker`, holding this process's identity ("host:pid since ...").

    `client` tells who holds it when we cannot take it.
    """

    def __init__(self, connection: redis.Redis, keys: Keys, *, ttl_s: float, client: BrokerClient):
        self.connection = connection
        self.keys = keys
        self.ttl_s = ttl_s
        self.client = client
        self.identity = f"{socket.gethostname()}:{os.getpid()} since {_now()}"
        self._lock = connection.lock(keys.broker, timeout=ttl_s, blocking=False, thread_local=False)
        self._last_renewed = 0.0

    def acquire(self) -> None:
        """Become the prefix's broker, or raise naming the one that is. A lock left by a broker
        that died on this machine (its pid is gone, or is ours: a restarted container) is taken
        over at once rather than after its TTL."""
        if not self._lock.acquire(token=self.identity.encode()):
            holder = self.client.broker_holder() or "another broker"
            if not (_died_here(holder) and self._take_over(holder)):
                raise BrokerAlreadyRunningError(
                    f"a broker is already running on prefix {self.keys.prefix!r}: {holder}; "
                    "stop it first, or use another --prefix"
                )
        self._last_renewed = time.monotonic()

    def _take_over(self, holder: str) -> bool:
        """Delete the dead broker's lock (only if it still names that broker) and take it."""
        deleted = self.connection.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end "
            "return 0",
            1,
            self.keys.broker,
            holder,
        )
        if deleted and self._lock.acquire(token=self.identity.encode()):
            log.warning("took over the lock of a broker that died here: %s", holder)
            return True
        return False

    def keep(self, *, force: bool = False) -> None:
        """Renew the lock (at most every third of its TTL unless `force`); take it again if it
        lapsed (an outage longer than its TTL). Raises if another broker took it meanwhile."""
        now = time.monotonic()
        if not force and now - self._last_renewed <= self.ttl_s / 3:
            return
        try:
            renewed = self._lock.reacquire()
        except redis.exceptions.LockNotOwnedError:
            renewed = bool(self._lock.acquire(token=self.identity.encode()))
        if not renewed:
            holder = self.client.broker_holder() or "another broker"
            raise BrokerAlreadyRunningError(f"lost the broker lock: {holder} took over")
        self._last_renewed = now

    def release(self) -> None:
        """Let the lock go; a no-op if it is no longer ours."""
        try:
            self._lock.release()
        except redis.exceptions.LockError:
            pass


class EpochGuard:
    """The token at `Keys.epoch`: set once by the first broker of a Redis, checked every step."""

    def __init__(self, connection: redis.Redis, keys: Keys) -> None:
        self.connection = connection
        self.keys = keys
        self.epoch: bytes | None = None

    def establish(self) -> None:
        """Set the epoch unless a predecessor did, and remember it. Call holding the lock."""
        self.connection.set(self.keys.epoch, secrets.token_hex(8), nx=True)
        self.epoch = self.connection.get(self.keys.epoch)  # type: ignore[assignment]

    def fetch(self, pipe: redis.client.Pipeline) -> None:
        """Queue the read of the epoch on `pipe`; hand its reply to `check`."""
        pipe.get(self.keys.epoch)

    def check_now(self) -> None:
        """Raise RedisDataLostError unless Redis still holds our epoch."""
        self.check(self.connection.get(self.keys.epoch))

    def check(self, current: Any) -> None:
        """Raise RedisDataLostError unless `current` (the epoch as read) is ours."""
        if current != self.epoch:
            raise RedisDataLostError(
                f"Redis lost its data: the key {self.keys.epoch!r} the broker set at start is "
                f"{'gone' if current is None else 'different'}. The server restarted without "
                "persistence, was flushed, or failed over to an empty replica. The broker stops "
                "rather than write on: submitted studies, queued trials and unread results are "
                "gone from Redis (trials told so far are safe in their storages). Turn on "
                "persistence (appendonly yes), then start the broker again and resubmit."
            )
