"""Batched trials (`submit --batch N`) with real workers and a real broker, killed mid-batch:
each trial still ends exactly once, and its objective runs once unless its worker was lost.

The dispatcher's side in-process: tests/dispatch/test_batches.py.
"""

from __future__ import annotations

import signal

import pytest
from optuna.trial import TrialState

from optuna_rq.dispatch import RETRY_OF_ATTR
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from tests.support.cluster import BOTH_ISOLATIONS, Cluster, kill_tree, wait_calls

pytestmark = pytest.mark.timeout(180)

ROUNDS = 2
"""Each kill is repeated: the lease and its grace race the retry, and the broker is killed at a
later call each round."""


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_worker_killed_mid_batch_loses_and_retries_each_of_its_trials(
    cluster: Cluster, round_: int
) -> None:
    cluster.start_broker()
    victim = cluster.start_workers(1)
    # One job of three: the first runs while the other two wait in it, never started.
    name = cluster.submit("steady", n_trials=3, concurrency=3, hold_s=1.5, extra=("--batch", "3"))
    wait_calls(cluster, 1)
    pid, parent = cluster.started()[0]
    kill_tree([parent, pid])  # the whole pool: nobody is left to report the trial
    assert victim.wait(timeout=10) == -signal.SIGKILL
    cluster.start_workers(1)

    _each_lost_and_retried_once(cluster, name)


@BOTH_ISOLATIONS
def test_killing_only_the_process_running_a_batch_loses_and_retries_each_of_its_trials(
    cluster: Cluster, isolation: str
) -> None:
    cluster.start_broker()
    pool = cluster.start_workers(1, isolation)
    name = cluster.submit("steady", n_trials=3, concurrency=3, hold_s=1.5, extra=("--batch", "3"))
    wait_calls(cluster, 1)
    pid, _parent = cluster.started()[0]
    kill_tree([pid])  # its pool reports the trial running; the two waiting go with the job

    _each_lost_and_retried_once(cluster, name)
    assert pool.poll() is None, "the pool itself lives on, with a new worker process"


def _each_lost_and_retried_once(cluster: Cluster, name: str) -> None:
    trials = cluster.check(name, complete=3, cap=3, failed=3)
    lost = [t for t in trials if t.state is TrialState.FAIL]
    assert {t.user_attrs[FAIL_REASON_ATTR] for t in lost} == {"worker_lost"}
    retried = {t.user_attrs[RETRY_OF_ATTR]: t for t in trials if RETRY_OF_ATTR in t.user_attrs}
    assert sorted(retried) == sorted(t.number for t in lost)
    assert all(retried[t.number].params == t.params for t in lost)
    calls = cluster.calls()
    # The killed call and its retry; the two that waited in the batch ran once, as retries.
    assert sorted(calls.values()) == [1, 1, 2], calls


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_broker_killed_while_batches_run_sends_none_of_their_trials_again(
    cluster: Cluster, round_: int
) -> None:
    cluster.start_workers(2)
    first = cluster.start_broker()
    name = cluster.submit("steady", n_trials=12, concurrency=6, hold_s=0.3, extra=("--batch", "3"))
    # Killed once the fourth (or fifth) call has started: batches are queued, running, ending.
    wait_calls(cluster, 4 + round_)
    first.send_signal(signal.SIGKILL)
    assert first.wait(timeout=60) == -signal.SIGKILL
    cluster.start_broker()  # takes over the dead broker's lock at once

    cluster.check(name, complete=12, cap=6, failed=0)
    calls = cluster.calls()
    assert len(calls) == 12 and set(calls.values()) == {1}, calls
