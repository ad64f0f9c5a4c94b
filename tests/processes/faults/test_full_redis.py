"""A full Redis: at `maxmemory` with `noeviction`, it refuses every write that may grow its data
(OutOfMemoryError) and still serves reads, deletions, XACK and PEXPIRE. The broker pauses and
says why; workers hold their results, keep their leases, and deliver once Redis has room."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from optuna.trial import TrialState
from rq.job import Job

from optuna_rq.daemon.lock import BrokerLock
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import RUN_TRIAL, Keys, trial_queue
from optuna_rq.protocol.queue import MsgpackSerializer
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from optuna_rq.workers.rq_worker import ForkingTrialWorker, TrialWorker
from tests.support.cluster import (
    BOTH_ISOLATIONS,
    LEASE_TTL_S,
    Cluster,
    RedisServer,
    start_optimizer,
    wait_calls,
)
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

FILLER_BYTES = 32 * 2**20
FILLER = "full-redis-test:filler"


def fill(conn: redis.Redis) -> int:
    """Make Redis full: a filler key, then `maxmemory` set below what it uses. Returns the
    limit. Every write that may grow the data is refused until `free`."""
    conn.config_set("maxmemory-policy", "noeviction")
    conn.config_set("maxmemory", 0)  # no limit while the filler goes in
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


CYCLES = 2
"""Full spells in one study, each caught at another point of the broker's turns and the
workers' trials."""


@BOTH_ISOLATIONS
def test_a_full_redis_pauses_the_broker_and_workers_hold_their_results(
    cluster: Cluster, tmp_path: Path, isolation: str
) -> None:
    broker_log, workers_log = tmp_path / "broker.log", tmp_path / "workers.log"
    cluster.start_workers(3, isolation, log=workers_log)
    broker = cluster.start_broker(log=broker_log)
    pid = broker.pid
    n_trials = 24
    name = cluster.submit("steady", n_trials=n_trials, concurrency=3, hold_s=1.0)
    conn = cluster.conn
    results = Keys(cluster.prefix).results
    for cycle in range(1, CYCLES + 1):
        wait_calls(cluster, 4 + 6 * (cycle - 1) + cycle)  # three running, a different moment
        limit = fill(conn)
        appended = conn.xlen(results)

        # Held full past three lease TTLs: a lease not kept alive would lapse (its attempt
        # counted lost), a result not held would be dropped, a broker that did not wait would
        # exit.
        said = f"Redis is out of memory (maxmemory {limit}): waiting"
        wait_until(
            lambda: broker_log.read_text().count(said) == 1,  # noqa: B023
            timeout_s=30,
            message=f"the broker did not say once that it waits for memory: {said}",
        )
        held_until = time.monotonic() + 3 * LEASE_TTL_S
        while time.monotonic() < held_until:  # the full spell itself, lived through
            assert broker.poll() is None, broker_log.read_text()[-3000:]
            time.sleep(0.1)
        with pytest.raises(redis.exceptions.OutOfMemoryError):
            conn.set("full-redis-test:probe", 1)  # it was full all along
        assert conn.xlen(results) == appended, "a result got into a full Redis"
        assert any(conn.scan_iter(match=f"{cluster.prefix}:*lease*")), "held leases lapsed"
        free(conn)
        wait_until(
            lambda: broker_log.read_text().count("Redis has room again") == cycle,  # noqa: B023
            timeout_s=30,
            message="the broker did not go on",
        )

    cluster.check(name, complete=n_trials, cap=3, failed=0)
    assert broker.poll() is None and broker.pid == pid
    text = broker_log.read_text()
    assert "Traceback" not in text, text[-3000:]
    assert "maxmemory-policy is" not in text  # noeviction: nothing to warn of
    worker_text = workers_log.read_text()
    assert "Traceback" not in worker_text, worker_text[-3000:]
    # Every result that met a full Redis was held, said once, and delivered.
    held = worker_text.count("holding the result of study")
    assert held >= CYCLES, worker_text[-3000:]
    assert worker_text.count("delivered the result of study") == held, worker_text[-3000:]


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


def _worker(conn: redis.Redis, name: str) -> TrialWorker:
    queue = trial_queue(conn, "full-redis-test:queue")
    return TrialWorker([queue], connection=conn, serializer=MsgpackSerializer, name=name)


# The RQ writes a trial's job needs, each waited out (sent again once Redis has room), called on a
# worker that has dequeued `job` and prepared its execution.
NEEDED: dict[str, Callable[[TrialWorker, Job, Any], object]] = {
    "register_birth": lambda worker, job, execution: _worker(
        worker.connection, "late"
    ).register_birth(),
    "dequeue": lambda worker, job, execution: worker.dequeue_job_and_maintain_ttl(1),
    "prepare_execution": lambda worker, job, execution: worker.prepare_execution(job),
    # A forking worker's horse sends RQ's own (a TrialWorker sends it with `prepare_execution`).
    "prepare_job_execution": lambda worker, job, execution: ForkingTrialWorker(
        worker.queues, connection=worker.connection, serializer=MsgpackSerializer, name="horse"
    ).prepare_job_execution(job),
    "handle_job_success": lambda worker, job, execution: worker.handle_job_success(
        job, worker.queues[0], worker.queues[0].started_job_registry, execution
    ),
}


@pytest.mark.parametrize("write", sorted(NEEDED))
def test_a_worker_waits_out_a_full_redis_for_the_writes_a_trial_needs(
    aof_redis: RedisServer, caplog: pytest.LogCaptureFixture, write: str
) -> None:
    caplog.set_level(logging.INFO, logger="optuna_rq.plumbing.redis_waits")
    conn = connect(aof_redis.url)
    worker, leaving = _worker(conn, "w"), _worker(conn, "leaving")
    worker.register_birth()
    leaving.register_birth()
    queue = worker.queues[0]
    queue.enqueue(RUN_TRIAL, b"payload")
    job, _ = worker.dequeue_job_and_maintain_ttl(1)
    execution = worker.prepare_execution(job)
    job.started_at = job.ended_at = job.enqueued_at
    queue.enqueue(RUN_TRIAL, b"payload")  # the next one, for `dequeue`
    fill(conn)

    # The writes that may be skipped are, and the worker lives on
    worker._key_expires_at = 0.0  # a heartbeat is due
    worker.heartbeat()
    worker.set_state("busy")
    worker.job_done()
    worker.run_maintenance_tasks()
    leaving.register_death()  # type: ignore[no-untyped-call]

    # The one a trial needs waits, says so once, and goes in when Redis has room
    errors: list[BaseException] = []

    def run() -> None:
        try:
            NEEDED[write](worker, job, execution)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_until(
        lambda: "Redis is out of memory (maxmemory" in caplog.text,
        timeout_s=10,
        message="the worker did not say Redis is full",
    )
    assert thread.is_alive(), errors
    free(conn)
    thread.join(timeout=30)
    assert not thread.is_alive() and not errors, errors
    assert caplog.text.count("Redis is out of memory") == 1, caplog.text
    conn.close()


def test_a_pools_parent_holds_the_result_it_reports_and_keeps_the_other_leases(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Given two trials of one study running, and a third stuck in C code past its timeout
    workers_log = tmp_path / "workers.log"
    cluster.start_workers(3, log=workers_log)
    broker = cluster.start_broker()
    # Held long enough to be running still when the spell is checked, however late the stuck
    # one starts on a loaded machine.
    steady = cluster.submit("steady", n_trials=4, concurrency=2, hold_s=8 * LEASE_TTL_S)
    wait_calls(cluster, 2)
    # Its timeout leaves the fill below time to end first, on a loaded machine too: filled after
    # the kill, the parent's report would go through at once and nothing would be held.
    stuck = cluster.submit("stuck_in_c", n_trials=1, concurrency=1, extra=("--trial-timeout", "4"))
    wait_calls(cluster, 3)

    # When Redis is full as the pool's parent kills the stuck one and reports it (its `timeout`
    # result held in the parent, which must renew its other children's leases meanwhile)
    fill(cluster.conn)
    wait_until(
        lambda: f"holding the result of study {stuck!r}" in workers_log.read_text(),
        timeout_s=30,
        message="the pool's parent did not hold the result it reports",
    )
    held_until = time.monotonic() + 1.5 * LEASE_TTL_S
    while time.monotonic() < held_until:  # the full spell itself, past a lease TTL
        assert broker.poll() is None
        time.sleep(0.1)
    # the two running objectives' leases (renewed by the parent while it waits) and the held one
    assert "COMPLETE" not in workers_log.read_text(), "the spell came too late to tell"
    leases = list(cluster.conn.scan_iter(match=f"{cluster.prefix}:*lease*"))
    assert len(leases) == 3, leases
    free(cluster.conn)

    # Then every result is told once: the stuck one `timeout`, the others COMPLETE, none lost
    trials = cluster.check(stuck, complete=0, cap=3, failed=1)
    assert trials[0].user_attrs[FAIL_REASON_ATTR] == "timeout", trials[0].user_attrs
    cluster.check(steady, complete=4, cap=3, failed=0)
    text = workers_log.read_text()
    assert f"delivered the result of study {stuck!r}" in text, text[-3000:]
    assert "Traceback" not in text, text[-3000:]


def test_the_python_api_waits_out_a_full_redis(cluster: Cluster) -> None:
    cluster.start_workers(2)
    run = start_optimizer(cluster, hold_s=0.5)
    fill(cluster.conn)
    # (The Optimizer says Redis is full when it writes during the spell: if a result was told
    # just before it and its slot refilled; with none, it only reads, and waits as it is.)
    held_until = time.monotonic() + 3 * LEASE_TTL_S
    while time.monotonic() < held_until:  # the full spell itself
        assert run.thread.is_alive(), run.errors
        time.sleep(0.1)
    free(cluster.conn)

    states = run.finished()
    assert states.count(TrialState.COMPLETE) == 10, states
    assert TrialState.RUNNING not in states


def test_a_fenced_write_on_a_full_redis_does_all_or_nothing(aof_redis: RedisServer) -> None:
    """A full Redis refuses commands that grow its data and runs those that shrink or keep it.
    The broker's fenced writes are refused whole: a command taken off one list onto another
    (as the inbox hands a bulk command to the backlog) is never trimmed without being pushed,
    in either order."""
    conn = connect(aof_redis.url)
    keys = Keys("fullfence")
    lock = BrokerLock(conn, keys, ttl_s=30)
    lock.acquire()
    fenced = lock.connection
    conn.rpush("fullfence:inbox", "a", "b")
    fill(conn)
    try:
        for trim_first in (True, False):
            pipe = fenced.pipeline(transaction=True)
            if trim_first:
                pipe.ltrim("fullfence:inbox", 1, -1)
            pipe.rpush("fullfence:backlog", "a")
            if not trim_first:
                pipe.ltrim("fullfence:inbox", 1, -1)
            with pytest.raises(redis.exceptions.OutOfMemoryError):
                pipe.execute()
            assert conn.lrange("fullfence:inbox", 0, -1) == [b"a", b"b"], trim_first
            assert not conn.exists("fullfence:backlog"), trim_first
    finally:
        free(conn)
    pipe = fenced.pipeline(transaction=True)
    pipe.rpush("fullfence:backlog", "a")
    pipe.ltrim("fullfence:inbox", 1, -1)
    pipe.execute()
    assert conn.lrange("fullfence:inbox", 0, -1) == [b"b"]
    assert conn.lrange("fullfence:backlog", 0, -1) == [b"a"]
