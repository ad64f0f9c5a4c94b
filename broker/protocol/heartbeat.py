"""Who is alive: the heartbeat each worker pool keeps in Redis, and how both sides read it.

A pool's parent process writes a signed `PoolHeartbeat` to `Keys.pool(id)` with a TTL of its
lease TTL, renewed every quarter of it, and adds its id to `Keys.pools`. A pool that is
SIGKILLed, frozen or cut off stops renewing, and its key expires within one lease TTL: the broker
then counts its workers out of fair share, `optuna_rq_live_workers` and `desired_workers`. RQ's
own worker registrations live 420 s after their last heartbeat; they are not what decides.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol.keys import Keys
from optuna_rq.protocol.schema import Int, Message, Text, Texts, version_field, wire
from optuna_rq.protocol.signing import Record, Signer

if TYPE_CHECKING:
    import redis

__all__ = ["PoolHeartbeat", "live_pools", "workers_on"]


@dataclass(frozen=True, kw_only=True)
class PoolHeartbeat(Message):
    """One pool, as it last reported: the RQ queues its workers listen to (in priority order), how
    many workers it runs now, how many run a trial."""

    pool: str = wire(Text())
    host: str = wire(Text())
    pid: int = wire(Int(minimum=0))
    queues: list[str] = wire(Texts())
    workers: int = wire(Int(minimum=0))
    busy: int = wire(Int(minimum=0))
    v: int = version_field()


def live_pools(
    connection: redis.Redis, keys: Keys, signer: Signer, *, prune: bool = False
) -> list[PoolHeartbeat]:
    """The pools whose heartbeat has not expired; a heartbeat that is not validly signed is
    ignored (and so is its pool). With `prune` (the broker's), ids whose key expired are
    dropped from `Keys.pools`: the others only read (a front door's Redis user may not write
    there)."""
    members: Any = connection.smembers(keys.pools)
    ids = sorted(bytes(i).decode() for i in members)
    if not ids:
        return []
    raws = connection.mget([keys.pool(i) for i in ids])
    gone = [i for i, raw in zip(ids, raws, strict=True) if raw is None]
    if gone and prune:
        connection.srem(keys.pools, *gone)
    pools = []
    for raw in raws:
        if raw is None:
            continue
        try:
            pools.append(PoolHeartbeat.decode(signer.open(Record.HEARTBEAT, bytes(raw))))  # type: ignore[arg-type]
        except ProtocolError:
            continue
    return pools


def workers_on(pools: Iterable[PoolHeartbeat], queue: str) -> int:
    """How many live workers listen to RQ queue `queue`."""
    return sum(p.workers for p in pools if queue in p.queues)
