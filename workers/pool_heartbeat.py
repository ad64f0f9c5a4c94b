"""The pool's heartbeat: how the broker knows which workers are alive, and on which queues.

The pool's parent writes a signed `PoolHeartbeat` to `Keys.pool(id)` every quarter of the lease
TTL, expiring after one lease TTL. A SIGKILLed or frozen pool stops writing, so it drops out of
the live workers (fair share, `optuna_rq_live_workers`, `desired_workers`) within a lease TTL; a
pool that stops cleanly removes its heartbeat at once.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid

import redis

from optuna_rq.plumbing.outages import UNREACHABLE, outage_of
from optuna_rq.protocol import Keys, PoolHeartbeat, Record, Signer

__all__ = ["Heartbeat"]

log = logging.getLogger("optuna_rq.pool")


class Heartbeat:
    """One pool's heartbeat. `beat` writes it when due; `stop` removes it."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        signer: Signer,
        *,
        queues: list[str],
        ttl_s: float,
    ) -> None:
        self.connection = connection
        self.keys = keys
        self.signer = signer
        self.queues = queues
        self.pool_id = f"{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:6]}"
        self.key = keys.pool(self.pool_id)
        self.ttl_ms = max(1, int(ttl_s * 1000))
        self.every_s = ttl_s / 4
        self._next = 0.0
        self._failing = False

    def next_wakeup(self, now: float) -> float:
        return max(0.0, self._next - now)

    def beat(self, now: float, *, workers: int, busy: int, force: bool = False) -> None:
        """Write the heartbeat if one is due (or `force`): `workers` running, `busy` of them
        running a trial. A Redis error is logged once and retried at the next beat."""
        if not force and now < self._next:
            return
        self._next = now + self.every_s
        beat = PoolHeartbeat(
            pool=self.pool_id,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=self.queues,
            workers=workers,
            busy=busy,
        )
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.set(self.key, self.signer.seal(Record.HEARTBEAT, beat.encode()), px=self.ttl_ms)
            pipe.sadd(self.keys.pools, self.pool_id)
            pipe.execute()
        except UNREACHABLE as exc:
            outage_of(self.connection).failed(exc)  # logged once per outage, not per beat
            return
        except redis.RedisError as exc:
            if not self._failing:
                log.warning("cannot write the pool's heartbeat (will keep trying): %s", exc)
            self._failing = True
            return
        self._failing = False
        outage_of(self.connection).recovered()

    def stop(self) -> bool:
        """Remove the heartbeat: this pool's workers stop counting now. False if Redis would not
        take it (the heartbeat then expires on its own, within a lease TTL); not even tried
        while Redis is known to be away."""
        outage = outage_of(self.connection)
        if outage.down:
            return False
        try:
            pipe = self.connection.pipeline(transaction=False)
            pipe.delete(self.key)
            pipe.srem(self.keys.pools, self.pool_id)
            pipe.execute()
        except UNREACHABLE as exc:
            outage.failed(exc)
            return False
        except redis.RedisError as exc:
            log.debug("could not remove the pool's heartbeat: %s", exc)
            return False
        return True
