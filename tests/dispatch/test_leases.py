"""LeaseWatch on a real Redis: when an outstanding attempt counts as lost, and when not."""

from __future__ import annotations

import redis
from rq.job import Job

from optuna_rq.dispatch.leases import LeaseWatch, Watched
from tests.support.helpers import wait_until


def _job(conn: redis.Redis, job_id: str, status: str) -> None:
    conn.hset(Job.key_for(job_id), "status", status)


def _watch(conn: redis.Redis, prefix: str, grace_s: float = 0.2) -> LeaseWatch:
    return LeaseWatch(conn, intermediate_key=f"{prefix}:intermediate", grace_s=grace_s)


def test_a_queued_job_is_never_lost_however_long_it_waits(conn: redis.Redis, prefix: str) -> None:
    watch = _watch(conn, prefix, grace_s=0)
    attempt = Watched(f"{prefix}-queued", f"{prefix}:lease:a")
    _job(conn, attempt.job_id, "queued")
    assert watch.check([attempt]) == [] and watch.check([attempt]) == []


def test_a_lease_seen_then_gone_is_lost_at_once(conn: redis.Redis, prefix: str) -> None:
    watch = _watch(conn, prefix, grace_s=3600)
    attempt = Watched(f"{prefix}-started", f"{prefix}:lease:b")
    _job(conn, attempt.job_id, "started")
    conn.set(attempt.lease, "worker", px=60_000)
    assert watch.check([attempt]) == []
    conn.delete(attempt.lease)
    [(lost, why)] = watch.check([attempt])
    assert lost == attempt and "stopped renewing the lease" in why


def test_a_started_job_that_never_takes_a_lease_is_lost_after_the_grace(
    conn: redis.Redis, prefix: str
) -> None:
    watch = _watch(conn, prefix, grace_s=0.2)
    attempt = Watched(f"{prefix}-unleased", f"{prefix}:lease:c")
    _job(conn, attempt.job_id, "started")
    assert watch.check([attempt]) == []  # the worker may be about to take it
    wait_until(lambda: watch.check([attempt]), timeout_s=5)


def test_a_job_dequeued_but_never_started_is_lost_after_the_grace(
    conn: redis.Redis, prefix: str
) -> None:
    """RQ moved it to the intermediate list, then its worker died: its status still says
    queued, and RQ would notice only after a minute, in some worker's maintenance pass."""
    watch = _watch(conn, prefix, grace_s=0.2)
    attempt = Watched(f"{prefix}-taken", f"{prefix}:lease:d")
    _job(conn, attempt.job_id, "queued")
    conn.rpush(f"{prefix}:intermediate", attempt.job_id)
    assert watch.check([attempt]) == []
    wait_until(lambda: watch.check([attempt]), timeout_s=5)


def test_a_job_that_ended_without_a_lease_or_is_gone_is_lost(
    conn: redis.Redis, prefix: str
) -> None:
    watch = _watch(conn, prefix, grace_s=3600)
    failed = Watched(f"{prefix}-failed", f"{prefix}:lease:e")
    gone = Watched(f"{prefix}-gone", f"{prefix}:lease:f")
    _job(conn, failed.job_id, "failed")
    reasons = dict(watch.check([failed, gone]))
    assert "is failed" in reasons[failed] and "is gone" in reasons[gone]


def test_after_an_outage_a_missing_lease_gets_the_grace_again(
    conn: redis.Redis, prefix: str
) -> None:
    watch = _watch(conn, prefix, grace_s=3600)
    attempt = Watched(f"{prefix}-blip", f"{prefix}:lease:g")
    _job(conn, attempt.job_id, "started")
    conn.set(attempt.lease, "worker", px=60_000)
    assert watch.check([attempt]) == []
    watch.reset()
    conn.delete(attempt.lease)  # lapsed while Redis was away; its worker will renew it
    assert watch.check([attempt]) == []


def test_trials_waiting_in_a_batch_behind_a_leased_one_are_not_lost(
    conn: redis.Redis, prefix: str
) -> None:
    """A worker leases a batch's trials one after another: while one runs, the others of its
    job wait unleased, however long it runs."""
    watch = _watch(conn, prefix, grace_s=0)
    job = f"{prefix}-batch"
    running, *waiting = (Watched(job, f"{prefix}:lease:batch{i}") for i in range(3))
    _job(conn, job, "started")
    conn.set(running.lease, "worker", px=60_000)
    for _ in range(3):
        assert watch.check([running, *waiting]) == []


def test_a_batch_whose_worker_is_lost_loses_the_running_trial_and_those_waiting(
    conn: redis.Redis, prefix: str
) -> None:
    watch = _watch(conn, prefix, grace_s=0.2)
    job = f"{prefix}-lostbatch"
    running, *waiting = (Watched(job, f"{prefix}:lease:lost{i}") for i in range(3))
    _job(conn, job, "started")
    conn.set(running.lease, "worker", px=60_000)
    assert watch.check([running, *waiting]) == []
    conn.delete(running.lease)  # the worker stopped renewing it
    [(lost, why)] = watch.check([running, *waiting])
    assert lost == running and "stopped renewing the lease" in why
    # No trial of the job holds a lease now, and its job stays started: the others are lost
    # once the grace has passed, as a job taken and never leased is.
    wait_until(lambda: {w for w, _ in watch.check(waiting)} == set(waiting), timeout_s=5)


def test_the_next_trial_of_a_batch_leased_within_the_grace_is_not_lost(
    conn: redis.Redis, prefix: str
) -> None:
    watch = _watch(conn, prefix, grace_s=3600)
    job = f"{prefix}-nextbatch"
    first, second = (Watched(job, f"{prefix}:lease:next{i}") for i in range(2))
    _job(conn, job, "started")
    conn.set(first.lease, "worker", px=60_000)
    assert watch.check([first, second]) == []
    conn.delete(first.lease)  # its result delivered: the dispatcher forgets it
    watch.forget(first.lease)
    assert watch.check([second]) == []  # between two trials: within the grace
    conn.set(second.lease, "worker", px=60_000)
    assert watch.check([second]) == []
