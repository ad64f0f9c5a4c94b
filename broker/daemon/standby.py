"""A hot standby: a broker started with `--standby` waits for the prefix's lock while another
broker holds it, instead of exiting, and takes over when that broker dies or freezes.

It asks for the lock at a fraction of the lock's TTL, jittered so that several standbys do not ask
in step, and wakes just after the lock would expire if its holder stopped renewing it: a standby
takes over within the TTL of the active broker's last renewal (at once if the active broker died
on the same machine: `BrokerLock.try_acquire`). Standing by writes nothing to Redis (the
acquisition script writes only when the lock is free), opens no study storage and reads no
command. It logs one line when it starts standing by (and one when the active broker changes), not
one per poll, and one for each study it could not resume were it to take over (another broker's
default storage: `continuity`); its /healthz passes and its /readyz fails with "standing by"
(`broker_health`).

Once it holds the lock it is a broker like a restarted one: it re-attaches every stored study
(`Registry.reattach`). The broker it took over from, if it was frozen and wakes, finds each of its
writes refused by the fence (`daemon.fence`) and stops without writing anything more.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable

import redis

from optuna_rq.daemon.broker_health import BrokerHealth
from optuna_rq.daemon.lock import BrokerLock
from optuna_rq.plumbing.redis_waits import wait_for_redis
from optuna_rq.protocol.liveness import read_liveness

__all__ = ["POLL_FRACTION", "RECHECK_S", "Standby"]

log = logging.getLogger("optuna_rq.broker")

POLL_FRACTION = 0.25
"""A standby asks for the lock every this fraction of its TTL (jittered by `JITTER`), and just
after the lock would expire."""
JITTER = 0.2
RECHECK_S = 60.0
"""How often a standby checks that it could resume every study (`continuity.not_resumable`)."""
_PAST_EXPIRY_S = 0.02
"""How long after the lock's expiry a standby asks again: the holder's renewal, if it comes,
reaches Redis first."""


class Standby:
    """Waits for the lock of `lock`'s prefix (`wait`), reporting to `health` as it goes."""

    def __init__(
        self,
        lock: BrokerLock,
        health: BrokerHealth,
        *,
        max_outage_backoff_s: float = 5.0,
        jitter: Callable[[], float] = random.random,
        not_resumable: Callable[[], list[str]] | None = None,
    ) -> None:
        self.lock = lock
        self.health = health
        self.max_outage_backoff_s = max_outage_backoff_s
        self.jitter = jitter
        self.not_resumable = not_resumable
        """Why each study this broker would not resume if it took over now
        (`continuity.not_resumable`): logged when it starts standing by, then every
        `RECHECK_S` for the studies not logged yet."""
        self._said: set[str] = set()
        self._checked_at: float | None = None

    def wait(self, stop: threading.Event) -> bool:
        """Take the lock, waiting while another broker holds it; False if `stop` was set first
        (SIGTERM, Ctrl-C: nothing was taken). Rides out Redis outages meanwhile."""
        started = time.monotonic()
        active: str | None = None  # the broker standing in the way, as last seen
        while not stop.is_set():
            try:
                holder = self.lock.try_acquire()
                if holder is None:
                    if active is not None:
                        self._took_over(active, time.monotonic() - started)
                    return True
                if holder != active:
                    log.info("standing by: the active broker is %s", holder)
                    active = holder
                self._say_not_resumable()
                self.health.standing_by(holder)
                pause_s = self._pause_s()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                self.health.outage(exc)
                waited = wait_for_redis(
                    self.lock.connection,
                    exc,
                    stop=stop,
                    max_backoff_s=self.max_outage_backoff_s,
                    beat=self.health.beat,  # waiting for Redis is alive
                )
                if waited is not None:
                    self.health.recovered()
                continue
            stop.wait(pause_s)
        log.info("stopped standing by; the active broker %s serves on", active or "?")
        return False

    def _say_not_resumable(self) -> None:
        now = time.monotonic()
        if self.not_resumable is None or (
            self._checked_at is not None and now - self._checked_at < RECHECK_S
        ):
            return
        self._checked_at = now
        try:
            reasons = self.not_resumable()
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # an outage: ridden out, then asked again
        except Exception as exc:  # a check that fails must not stop the standby
            log.warning("cannot check that this broker could resume the studies: %s", exc)
            return
        for why in reasons:
            if why not in self._said:
                log.error("if this broker takes over: %s", why)
        self._said = set(reasons)

    def _pause_s(self) -> float:
        """Until the next ask: a jittered fraction of the TTL, or just past the lock's expiry if
        that comes first; short enough for /healthz to see the standby beat."""
        every_s = self.lock.ttl_s * POLL_FRACTION * (1 + JITTER * (2 * self.jitter() - 1))
        every_s = min(every_s, self.health.stall_limit_s / 3)
        left_s = self.lock.remaining_s()
        if left_s is None:  # it expired between the ask and now
            return 0.0
        return min(every_s, left_s + _PAST_EXPIRY_S)

    def _took_over(self, holder: str, standing_by_s: float) -> None:
        """Say whom this broker took over from, and how long the prefix went unserved: since
        that broker's last turn (by the Redis server's clock), or if it never turned, since this
        one started standing by."""
        unserved_s = standing_by_s
        try:
            liveness = read_liveness(self.lock.connection, self.lock.keys)
        except redis.RedisError:
            liveness = None
        if (
            liveness is not None
            and liveness.last_broker == holder
            and liveness.last_turn_age_s is not None
        ):
            unserved_s = liveness.last_turn_age_s
        log.warning("took over from %s after %.1f s", holder, unserved_s)
