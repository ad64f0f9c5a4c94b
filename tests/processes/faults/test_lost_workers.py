"""Workers that die, freeze or crash mid-trial: the attempt is lost, its params run again."""

from __future__ import annotations

import signal
import time

import pytest
from optuna.trial import TrialState

from optuna_rq.dispatch import ATTEMPT_ATTR, RETRY_OF_ATTR
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from tests.support.cluster import BOTH_ISOLATIONS, LEASE_TTL_S, Cluster, kill_tree, wait_calls
from tests.support.fault_objectives import running_pid
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)


def _lost_and_retries(trials: list) -> tuple[list, dict[int, object]]:
    lost = [t for t in trials if t.state is TrialState.FAIL]
    retries = {t.user_attrs[RETRY_OF_ATTR]: t for t in trials if RETRY_OF_ATTR in t.user_attrs}
    return lost, retries


def test_a_worker_killed_with_its_whole_process_tree_is_lost_within_the_lease_ttl(
    cluster: Cluster,
) -> None:
    cluster.start_broker()
    victim = cluster.start_workers(1)
    name = cluster.submit("steady", n_trials=4, concurrency=2, hold_s=1.5)
    wait_calls(cluster, 1)
    pid, parent = cluster.started()[0]
    assert parent == victim.pid
    killed_at = time.time()
    kill_tree([parent, pid])  # the parent first: nobody is left to report the trial
    assert victim.wait(timeout=10) == -signal.SIGKILL
    cluster.start_workers(2)

    trials = cluster.check(name, complete=4, cap=2, failed=1)
    (lost,), retries = _lost_and_retries(trials)
    assert lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost"
    assert "stopped renewing the lease" in lost.user_attrs[FAIL_ERROR_ATTR]
    retry = retries[lost.number]
    assert retry.params == lost.params and retry.state is TrialState.COMPLETE
    assert retry.user_attrs[ATTEMPT_ATTR] == 2
    assert cluster.calls()[repr(lost.params["x"])] == 2  # the killed call, and the retry
    detected_s = lost.datetime_complete.timestamp() - killed_at
    print(f"\n  lost {detected_s:.2f}s after SIGKILL (lease TTL {LEASE_TTL_S:g}s)")
    assert detected_s > 0


@BOTH_ISOLATIONS
def test_killing_only_the_process_running_the_objective(cluster: Cluster, isolation: str) -> None:
    cluster.start_broker()
    pool = cluster.start_workers(2, isolation)
    name = cluster.submit("steady", n_trials=6, concurrency=2, hold_s=1.0)
    wait_calls(cluster, 1)
    pid, _parent = cluster.started()[0]
    killed_at = time.time()
    kill_tree([pid])

    trials = cluster.check(name, complete=6, cap=2, failed=1)
    (lost,), retries = _lost_and_retries(trials)
    assert lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost"
    assert (
        f"process {pid} running the trial was killed by SIGKILL"
        in (lost.user_attrs[FAIL_ERROR_ATTR])
    )
    assert retries[lost.number].params == lost.params
    assert pool.poll() is None, "the pool itself lives on, with a new worker process"
    detected_s = lost.datetime_complete.timestamp() - killed_at
    print(f"\n  lost {detected_s:.3f}s after SIGKILL: reported by the pool, not the lease")


def test_a_frozen_worker_past_its_lease_is_retried_and_its_late_result_dropped(
    cluster: Cluster,
) -> None:
    cluster.start_broker()
    cluster.start_workers(1)
    name = cluster.submit("steady", n_trials=1, concurrency=1, hold_s=2.0)
    wait_calls(cluster, 1)
    pid, parent = cluster.started()[0]
    kill_tree([parent, pid], signal.SIGSTOP)  # a VM paused, a laptop lid closed
    try:
        cluster.start_workers(1)  # the retry runs here
        cluster.wait_finished(name)
    finally:
        kill_tree([parent, pid], signal.SIGCONT)
    wait_until(lambda: cluster.dropped() == 1, timeout_s=30, message="no stale result dropped")

    trials = cluster.check(name, complete=1, cap=1, failed=1)
    (lost,), retries = _lost_and_retries(trials)
    assert lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost"
    assert retries[lost.number].state is TrialState.COMPLETE
    assert cluster.calls()[repr(lost.params["x"])] == 2  # the frozen call did finish, unheard


@BOTH_ISOLATIONS
def test_an_objective_that_exits_the_process_is_retried_then_fails(
    cluster: Cluster, isolation: str
) -> None:
    cluster.start_broker()
    cluster.start_workers(2, isolation)
    name = cluster.submit("exits", n_trials=2, concurrency=2)

    trials = cluster.check(name, complete=0, cap=2, failed=6)  # 2 trials x 3 attempts
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in trials} == {"worker_lost"}
    assert all("exited with code 3" in t.user_attrs[FAIL_ERROR_ATTR] for t in trials)
    _lost, retries = _lost_and_retries(trials)
    assert sorted(t.user_attrs[ATTEMPT_ATTR] for t in retries.values()) == [2, 2, 3, 3]
    first_attempts = [t for t in trials if RETRY_OF_ATTR not in t.user_attrs]
    assert len(first_attempts) == 2  # the budget: retries did not eat it
    for first in first_attempts:
        second = retries[first.number]
        third = retries[second.number]
        assert first.params == second.params == third.params
        assert "not retried: 3 attempts, max retries 2" in third.user_attrs[FAIL_ERROR_ATTR]


def test_the_cap_holds_while_a_fifth_of_the_attempts_are_killed(cluster: Cluster) -> None:
    cluster.start_broker()
    cluster.start_workers(6)
    name = cluster.submit(
        "churn", n_trials=30, concurrency=4, hold_s=0.1, extra=("--max-retries", "10")
    )

    trials = cluster.check(name, complete=30, cap=4)
    lost = [t for t in trials if t.state is TrialState.FAIL]
    assert lost, "no attempt was killed"
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in lost} == {"worker_lost"}
    assert len(trials) == 30 + len(lost)  # every lost attempt retried once more, no more
    assert max(cluster.samples()) <= 4


@BOTH_ISOLATIONS
def test_a_process_stuck_in_c_code_is_killed_at_its_timeout(
    cluster: Cluster, isolation: str
) -> None:
    cluster.start_broker()
    cluster.start_workers(1, isolation)
    name = cluster.submit("stuck_in_c", n_trials=2, concurrency=1, extra=("--trial-timeout", "1"))

    trials = cluster.check(name, complete=0, cap=1, failed=2)
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in trials} == {"timeout"}
    assert not any(RETRY_OF_ATTR in t.user_attrs for t in trials), "timeouts are not retried"
    assert all("1s timeout" in t.user_attrs[FAIL_ERROR_ATTR] for t in trials)
    assert not any(running_pid(pid) for pid, _ in cluster.started()), "a stuck process lives"


def test_python_code_past_its_timeout_is_stopped_without_killing_the_worker(
    cluster: Cluster,
) -> None:
    cluster.start_broker()
    cluster.start_workers(1)
    name = cluster.submit(
        "steady", n_trials=2, concurrency=1, hold_s=30, extra=("--trial-timeout", "1")
    )

    trials = cluster.check(name, complete=0, cap=1, failed=2)
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in trials} == {"timeout"}
    (first, _), (second, _) = cluster.started()
    assert first == second and running_pid(first), "RQ's alarm stopped it: same process"


def test_workers_die_with_their_pool_so_no_worker_runs_unsupervised(cluster: Cluster) -> None:
    cluster.start_broker()
    pool = cluster.start_workers(1)
    name = cluster.submit("steady", n_trials=2, concurrency=1, hold_s=1.0)
    wait_calls(cluster, 1)
    pid, parent = cluster.started()[0]
    kill_tree([parent])  # the parent alone: nothing would renew its child's lease
    assert pool.wait(timeout=10) == -signal.SIGKILL
    wait_until(lambda: not running_pid(pid), timeout_s=10, message="the orphan worker lives")
    cluster.start_workers(1)

    trials = cluster.check(name, complete=2, cap=1, failed=1)
    (lost,), retries = _lost_and_retries(trials)
    assert retries[lost.number].params == lost.params
