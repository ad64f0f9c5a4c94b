"""The check before a study storage write takes a proof of the fence made earlier in the same
turn of the loop, and only then: not before the turn's first fenced command, not after a wait on
Redis, not after the turn. Writes stay fenced whatever was proven."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from optuna_rq.daemon.lock import BrokerLock
from optuna_rq.errors import FenceLostError
from optuna_rq.protocol import Keys


@pytest.fixture
def lock(conn: redis.Redis, prefix: str) -> Iterator[BrokerLock]:
    lock = BrokerLock(conn, Keys(prefix), ttl_s=30)
    lock.acquire()
    yield lock
    conn.delete(lock.keys.broker)


def _taken_over(conn: redis.Redis, lock: BrokerLock) -> None:
    conn.set(lock.keys.broker, "another broker")


def test_outside_a_turn_every_check_asks_redis(conn: redis.Redis, lock: BrokerLock) -> None:
    lock.connection.set(f"{lock.keys.prefix}:x", 1)  # a fenced write
    _taken_over(conn, lock)
    with pytest.raises(FenceLostError):
        lock.check()


def test_a_turn_asks_redis_until_a_fenced_command_proved_the_fence(
    conn: redis.Redis, lock: BrokerLock
) -> None:
    with lock.connection.proving():
        _taken_over(conn, lock)
        with pytest.raises(FenceLostError):
            lock.check()  # nothing proven yet in this turn: Redis is asked


def test_a_proof_stands_for_the_rest_of_the_turn_but_never_for_a_write(
    conn: redis.Redis, lock: BrokerLock
) -> None:
    fenced = lock.connection
    with fenced.proving():
        fenced.set(f"{lock.keys.prefix}:x", 1)
        _taken_over(conn, lock)
        lock.check()  # proven by the write, a moment ago in this turn
        with pytest.raises(FenceLostError):
            fenced.set(f"{lock.keys.prefix}:x", 2)
        with pytest.raises(FenceLostError):
            lock.check()  # a refusal leaves nothing proven
    assert conn.get(f"{lock.keys.prefix}:x") == b"1"
    with pytest.raises(FenceLostError):
        lock.check()  # the turn is over


def test_the_epoch_and_the_lock_read_as_this_brokers_prove_the_fence_for_the_turn(
    conn: redis.Redis, lock: BrokerLock
) -> None:
    fenced = lock.connection
    with fenced.proving():
        lock.proved(fenced.fence.epoch, b"another broker")  # not its lock: nothing proven
        _taken_over(conn, lock)
        with pytest.raises(FenceLostError):
            lock.check()
        conn.set(lock.keys.broker, fenced.fence.token)
        pipe = fenced.pipeline(transaction=False)
        pipe.get(lock.keys.epoch)
        lock.fetch(pipe)
        lock.proved(*pipe.execute())
        _taken_over(conn, lock)
        lock.check()  # proven by the reads a moment ago in this turn


def test_a_wait_on_redis_drops_the_proof(conn: redis.Redis, lock: BrokerLock) -> None:
    fenced = lock.connection
    stream = f"{lock.keys.prefix}:s"
    fenced.xgroup_create(stream, "g", id="0", mkstream=True)
    with fenced.proving():
        assert fenced.xreadgroup("g", "c", {stream: ">"}, block=1) == []  # proven, then waited
        _taken_over(conn, lock)
        with pytest.raises(FenceLostError):
            lock.check()
