"""LeanBookkeeping skips a worker heartbeat only while the worker key already lives as long."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import redis
from rq import Queue
from rq.exceptions import StopRequested
from rq.job import Job, JobStatus
from rq.suspension import WORKERS_SUSPENDED

from optuna_rq.protocol import RUN_TRIAL, trial_queue
from optuna_rq.protocol.queue import MsgpackSerializer
from optuna_rq.workers.rq_worker import TrialWorker
from tests.support.helpers import wait_until


@pytest.fixture
def worker(conn: redis.Redis, prefix: str) -> Iterator[TrialWorker]:
    worker = TrialWorker(
        [trial_queue(conn, prefix)], connection=conn, serializer=MsgpackSerializer, name=prefix
    )
    worker.register_birth()
    yield worker
    worker.register_death()  # type: ignore[no-untyped-call]


def test_a_heartbeat_right_after_a_full_one_sends_nothing(
    worker: TrialWorker, conn: redis.Redis
) -> None:
    worker.heartbeat()
    conn.expire(worker.key, 100)  # what the key would keep if nothing else were sent
    worker.heartbeat()
    assert 0 < conn.ttl(worker.key) <= 100


def test_a_heartbeat_after_a_shorter_ttl_is_always_sent(
    worker: TrialWorker, conn: redis.Redis
) -> None:
    full_ttl = worker.worker_ttl + 60
    worker.heartbeat()
    # RQ heartbeats with a job's TTL when it starts one (prepare_job_execution), in its pipeline.
    with conn.pipeline() as pipe:
        worker.heartbeat(65, pipeline=pipe)
        pipe.execute()
    assert conn.ttl(worker.key) <= 65
    worker.heartbeat()  # before blocking on an empty queue: the key must outlive the wait
    assert conn.ttl(worker.key) > full_ttl - 5


def test_the_idle_after_a_job_is_written_once(worker: TrialWorker, conn: redis.Redis) -> None:
    worker.set_state("busy")
    worker.job_done()
    assert conn.hget(worker.key, "state") == b"idle"
    conn.hset(worker.key, "state", "tampered")
    worker.set_state("idle")  # already idle, as far as the worker knows: not written again
    assert conn.hget(worker.key, "state") == b"tampered"


def test_the_check_for_rq_suspend_after_a_job_sends_no_heartbeat(
    worker: TrialWorker, conn: redis.Redis
) -> None:
    worker.job_done()
    conn.expire(worker.key, 100)  # what the key would keep if a heartbeat were not sent
    worker.check_for_suspension(burst=False)
    assert 0 < conn.ttl(worker.key) <= 100


def test_rq_suspend_stops_a_burst_worker_and_holds_another_suspended_as_rq_shows_it(
    worker: TrialWorker, conn: redis.Redis
) -> None:
    conn.set(WORKERS_SUSPENDED, 1)
    try:
        with pytest.raises(StopRequested):
            worker.check_for_suspension(burst=True)
        worker.set_state("idle")
        checking = threading.Thread(target=worker.check_for_suspension, args=(False,))
        checking.start()
        wait_until(lambda: conn.hget(worker.key, "state") == b"suspended", timeout_s=10)
    finally:
        conn.delete(WORKERS_SUSPENDED)  # `rq resume`
    checking.join(timeout=10)
    assert not checking.is_alive()
    assert conn.hget(worker.key, "state") == b"idle"


def _taken(worker: TrialWorker, conn: redis.Redis, prefix: str) -> tuple[Queue, Job]:
    """A job enqueued on the trial queue `prefix` and taken by `worker`, not started yet."""
    queue = trial_queue(conn, prefix)
    queue.enqueue(RUN_TRIAL, b"payload")
    taken = worker.dequeue_job_and_maintain_ttl(timeout=1)
    assert taken is not None
    job, _queue = taken
    return queue, job


def test_a_job_starts_in_one_transaction_as_rq_shows_a_started_one(
    worker: TrialWorker, conn: redis.Redis, prefix: str
) -> None:
    queue, job = _taken(worker, conn, prefix)
    assert job.id.encode() in conn.lrange(queue.intermediate_queue_key, 0, -1)
    worker.prepare_execution(job)
    # What RQ's own two transactions leave, `rq info` and the dashboard read.
    assert conn.hget(worker.key, "state") == b"busy"
    assert 0 < conn.ttl(worker.key) <= worker.get_heartbeat_ttl(job)
    job.refresh()
    assert (job.get_status(), job.worker_name) == (JobStatus.STARTED, worker.name)
    assert conn.ttl(job.key) == -1
    assert job.id in queue.started_job_registry.get_job_ids()
    assert [e.id for e in job.get_executions()] == list(worker.executions)
    assert conn.lrange(queue.intermediate_queue_key, 0, -1) == []
    conn.hset(job.key, "status", "tampered")
    worker.prepare_job_execution(job, True)  # `perform_job` asks again: already sent
    assert conn.hget(job.key, "status") == b"tampered"


def test_a_job_ends_with_its_worker_idle_in_the_same_transaction(
    worker: TrialWorker, conn: redis.Redis, prefix: str
) -> None:
    queue, job = _taken(worker, conn, prefix)
    execution = worker.prepare_execution(job)
    job.started_at = job.ended_at = job.enqueued_at
    worker.handle_job_success(job, queue, queue.started_job_registry, execution)
    assert job.get_status(refresh=True) == JobStatus.FINISHED
    assert conn.hget(worker.key, "state") == b"idle"
    assert conn.ttl(worker.key) > worker.get_heartbeat_ttl(job)  # the worker's full TTL again
    conn.hset(worker.key, "state", "tampered")
    worker.job_done()  # sent with the job's end: nothing left to send
    assert conn.hget(worker.key, "state") == b"tampered"
