"""A full Redis: at `maxmemory` with `noeviction`, it refuses every write that may grow its data
(OutOfMemoryError) and still serves reads, deletions, XACK and PEXPIRE. The broker pauses and
says why; workers hold their results, keep their leases, and deliver once Redis has room."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis

from optuna_rq.protocol import Keys
from tests.faults.conftest import LEASE_TTL_S, Cluster, wait_calls
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

FILLER_BYTES = 32 * 2**20
FILLER = "full-redis-test:filler"


def fill(conn: redis.Redis) -> int:
    """Make Redis full: a filler key, then `maxmemory` set below what it uses. Returns the
    limit. Every write that may grow the data is refused until `free`."""
    conn.config_set("maxmemory-policy", "noeviction")
    chunk = b"x" * 2**18  # small pieces: a big argument's query buffer counts as used memory
    for _ in range(FILLER_BYTES // len(chunk)):
        conn.append(FILLER, chunk)
    used = int(conn.info("memory")["used_memory"])
    limit = used - FILLER_BYTES // 4
    conn.config_set("maxmemory", limit)
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        conn.set("full-redis-test:probe", 1)
    return limit


def free(conn: redis.Redis) -> None:
    """Memory frees: the filler goes, the limit stays."""
    conn.delete(FILLER)
    conn.set("full-redis-test:probe", 1)  # writes go in again


def test_a_full_redis_pauses_the_broker_and_workers_hold_their_results(
    cluster: Cluster, tmp_path: Path
) -> None:
    broker_log, workers_log = tmp_path / "broker.log", tmp_path / "workers.log"
    cluster.start_workers(3, log=workers_log)
    broker = cluster.start_broker(log=broker_log)
    pid = broker.pid
    n_trials = 18
    name = cluster.submit("steady", n_trials=n_trials, concurrency=3, hold_s=1.0)
    wait_calls(cluster, 4)  # a few trials in, three running
    conn = cluster.conn
    results = Keys(cluster.prefix).results
    limit = fill(conn)
    appended = conn.xlen(results)

    # Held full past three lease TTLs: a lease not kept alive would lapse (its attempt counted
    # lost), a result not held would be dropped, a broker that does not wait would exit.
    wait_until(
        lambda: f"Redis is out of memory (maxmemory {limit}): waiting" in broker_log.read_text(),
        timeout_s=30,
        message="the broker did not say it waits for memory",
    )
    held_until = time.monotonic() + 3 * LEASE_TTL_S
    while time.monotonic() < held_until:  # the full spell itself; the broker must live through it
        assert broker.poll() is None, broker_log.read_text()[-3000:]
        time.sleep(0.1)
    wait_until(
        lambda: "holding the result of study" in workers_log.read_text(),
        timeout_s=30,
        message=f"no worker held a result: {workers_log.read_text()[-4000:]}",
    )
    with pytest.raises(redis.exceptions.OutOfMemoryError):
        conn.set("full-redis-test:probe", 1)  # it was full all along
    assert conn.xlen(results) == appended, "a result got into a full Redis"
    held = [k for k in conn.scan_iter(match=f"{cluster.prefix}:*lease*")]
    assert held, "the leases of the held results lapsed"
    free(conn)

    cluster.check(name, complete=n_trials, cap=3, failed=0)
    assert broker.poll() is None and broker.pid == pid
    text = broker_log.read_text()
    assert "Redis has room again" in text, text[-3000:]
    assert "maxmemory-policy is" not in text  # noeviction: nothing to warn of
    assert "Traceback" not in text, text[-3000:]
    worker_text = workers_log.read_text()
    assert "delivered the result of study" in worker_text, worker_text[-3000:]
    assert "Traceback" not in worker_text, worker_text[-3000:]
    # Said once per held result, not once per try.
    assert worker_text.count("holding the result of study") <= 3, worker_text[-3000:]


def test_a_broker_on_a_redis_that_evicts_warns_at_start(cluster: Cluster, tmp_path: Path) -> None:
    cluster.conn.config_set("maxmemory-policy", "allkeys-lru")
    log = tmp_path / "broker.log"
    cluster.start_broker(log=log)
    wait_until(
        lambda: "maxmemory-policy is allkeys-lru" in log.read_text(),
        timeout_s=30,
        message="the broker did not warn of an evicting Redis",
    )
    assert "needs noeviction" in log.read_text()
