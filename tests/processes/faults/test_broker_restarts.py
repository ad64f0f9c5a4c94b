"""A broker SIGKILLed at any point and restarted re-attaches: nothing lost, nothing run twice."""

from __future__ import annotations

import signal

import pytest

from tests.support.cluster import Cluster, wait_calls
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)


def _each_called_once(cluster: Cluster, n_trials: int) -> None:
    calls = cluster.calls()
    assert len(calls) == n_trials and set(calls.values()) == {1}, calls


@pytest.mark.parametrize(
    "failpoint",
    ["after_ask=3", "before_tell=3", None],
    ids=["after-ask-before-enqueue", "after-result-before-tell", "while-jobs-run"],
)
def test_a_broker_killed_and_restarted_re_attaches(cluster: Cluster, failpoint: str | None) -> None:
    cluster.start_workers(2)
    first = cluster.start_broker(failpoints=failpoint or "")
    name = cluster.submit("steady", n_trials=10, concurrency=3, hold_s=0.3)
    if failpoint is None:
        # Killed once the fifth objective call has started: with two workers at least three
        # trials have ended and two are running. The objectives' own record says so at once,
        # where the broker's status (published between polls) can miss the moment.
        wait_calls(cluster, 5)
        first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    cluster.start_broker()  # takes over the dead broker's lock at once

    cluster.check(name, complete=10, cap=3, failed=0)
    _each_called_once(cluster, 10)


def test_a_trial_asked_ahead_waits_for_a_slot_after_a_restart(cluster: Cluster) -> None:
    # More workers than the cap, so that sending one trial too many would show as four
    # objectives running at once. The broker dies once the fourth trial, asked ahead, is in its
    # journal (durable at the first flush after the ask: the status it publishes next): the
    # restarted one finds four RUNNING, three of them enqueued, and holds the fourth back.
    cluster.start_workers(4)
    first = cluster.start_broker()
    name = cluster.submit(
        "steady", n_trials=6, concurrency=3, hold_s=5.0, extra=("--ask-ahead", "1")
    )
    wait_until(
        lambda: len(cluster.started()) == 3 and len(cluster.trials(name)) == 4,
        timeout_s=30,
        message="the fourth trial was not asked ahead",
    )
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=10) == -signal.SIGKILL
    assert len(cluster.trials(name)) == 4 and len(cluster.started()) == 3
    cluster.start_broker()

    cluster.check(name, complete=6, cap=3, failed=0)
    _each_called_once(cluster, 6)


def test_results_that_arrive_while_the_broker_is_down_are_told(cluster: Cluster) -> None:
    cluster.start_workers(3)
    broker = cluster.start_broker()
    name = cluster.submit("steady", n_trials=9, concurrency=3, hold_s=1.0)
    wait_calls(cluster, 3)
    broker.send_signal(signal.SIGKILL)
    assert broker.wait(timeout=10) == -signal.SIGKILL
    # The broker stays down until the three running trials have ended, their leases are gone,
    # and RQ has forgotten their jobs (FINISHED_JOB_TTL_S): only the stream has the results.
    results = f"{cluster.prefix}:results"
    wait_until(lambda: cluster.conn.xlen(results) >= 3, timeout_s=30)
    wait_until(lambda: not list(cluster.conn.scan_iter(match=f"{results}:lease:*")), timeout_s=30)
    wait_until(lambda: not list(cluster.conn.scan_iter(match="rq:job:orq-*")), timeout_s=30)
    cluster.start_broker()

    cluster.check(name, complete=9, cap=3, failed=0)
    _each_called_once(cluster, 9)
