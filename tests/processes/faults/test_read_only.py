"""A Redis that turned into a read-only replica (a failover moved the primary away, and the URL
still names this server) is waited out by the broker's loop, like an outage: it answers PING and
refuses every write until it is a primary again."""

from __future__ import annotations

import socket
import threading

import pytest
import redis

from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.redis_waits import wait_for_redis
from tests.support.cluster import RedisServer
from tests.support.helpers import wait_until


def _dead_port() -> int:
    """A port nothing listens on: a replica of it keeps its own data, never syncing."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_read_only_redis_is_waited_out_until_it_takes_writes(aof_redis: RedisServer) -> None:
    conn = connect(aof_redis.url)
    admin = redis.Redis(unix_socket_path=str(aof_redis.sock))
    try:
        conn.set("before", 1)
        admin.replicaof("127.0.0.1", _dead_port())
        with pytest.raises(redis.exceptions.ReadOnlyError) as refused:
            conn.set("during", 1)
        waited: list[float | None] = []
        stop = threading.Event()
        waiter = threading.Thread(
            target=lambda: waited.append(
                wait_for_redis(conn, refused.value, stop=stop, max_backoff_s=0.2)
            )
        )
        waiter.start()
        try:
            wait_until(lambda: waiter.is_alive(), timeout_s=5)
            assert not waited  # still read-only: still waiting
            admin.replicaof("no", "one")
            wait_until(lambda: bool(waited), timeout_s=30, message="the wait did not end")
        finally:
            stop.set()
            waiter.join(timeout=10)
        assert waited[0] is not None and waited[0] > 0
        conn.set("after", 1)  # it takes writes again, and kept what it had
        assert conn.get("before") == b"1"
    finally:
        admin.close()
        conn.close()
