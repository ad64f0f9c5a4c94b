"""SIGTERM or a terminal's Ctrl-C to a busy worker pool: once lets its trial finish and says
what the next one does; twice stops it now, naming the signal; a worker process stuck on its way
out is shown and killed."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from optuna.trial import TrialState
from rq import Worker

from optuna_rq.dispatch import RETRY_OF_ATTR
from optuna_rq.plumbing.failpoints import ENV_FAILPOINTS
from optuna_rq.protocol import Keys, trial_queue
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from tests.support.cluster import BOTH_ISOLATIONS, LEASE_TTL_S, Cluster, wait_calls
from tests.support.helpers import wait_until
from tests.support.terminal_pool import STACK_DUMP, TerminalPool
from tests.support.worker_processes import cli_env

pytestmark = pytest.mark.timeout(180)


def _idle(cluster: Cluster) -> int:
    queue = trial_queue(
        cluster.conn, Keys(cluster.prefix).trial_queue("tests.support.fault_objectives")
    )
    return sum(w.get_state() == "idle" for w in Worker.all(connection=cluster.conn, queue=queue))


def _shutdown_requested(cluster: Cluster) -> bool:
    queue = trial_queue(
        cluster.conn, Keys(cluster.prefix).trial_queue("tests.support.fault_objectives")
    )
    workers = Worker.all(connection=cluster.conn, queue=queue)
    return any(w.shutdown_requested_date is not None for w in workers)


@BOTH_ISOLATIONS
def test_one_sigterm_lets_the_running_trial_finish_and_be_told(
    cluster: Cluster, isolation: str
) -> None:
    cluster.start_broker()
    pool = cluster.start_workers(1, isolation)
    name = cluster.submit("steady", n_trials=1, concurrency=1, hold_s=2.0)
    wait_calls(cluster, 1)
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(timeout=30) == 0

    (trial,) = cluster.check(name, complete=1, cap=1, failed=0)
    assert trial.duration is not None and trial.duration.total_seconds() >= 2.0


def test_a_second_sigterm_stops_at_once_and_the_trial_is_retried(cluster: Cluster) -> None:
    cluster.start_broker()
    pool = cluster.start_workers(1)
    name = cluster.submit("steady", n_trials=1, concurrency=1, hold_s=4.0)
    wait_calls(cluster, 1)
    pool.send_signal(signal.SIGTERM)
    wait_until(lambda: _shutdown_requested(cluster), timeout_s=10)  # the first one landed
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(timeout=30) == 1
    cluster.start_workers(1)

    trials = cluster.check(name, complete=1, cap=1, failed=1)
    lost = next(t for t in trials if t.state is TrialState.FAIL)  # killed: it never finished
    assert lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost"
    assert "second SIGTERM" in lost.user_attrs[FAIL_ERROR_ATTR]
    retry = next(t for t in trials if t.user_attrs.get(RETRY_OF_ATTR) == lost.number)
    assert retry.params == lost.params and retry.state is TrialState.COMPLETE


def test_a_worker_stuck_after_a_warm_stop_has_its_stacks_logged_and_is_killed(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The pool's own stop always ends: a child that left RQ's loop and hangs (here at a
    failpoint) is, after `stuck_after_s`, made to dump its threads' stacks, then killed."""
    script = textwrap.dedent(
        f"""
        import logging, sys
        from optuna_rq.workers.pool import WorkerPool, WorkerSettings
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        settings = WorkerSettings(
            redis_url={cluster.server.url!r},
            prefix={cluster.prefix!r},
            modules=("tests.support.fault_objectives",),
            stuck_after_s=1.0,
        )
        sys.exit(WorkerPool(settings).run())
        """
    )
    log = tmp_path / "pool.log"
    with open(log, "wb") as out:
        pool = subprocess.Popen(
            [sys.executable, "-c", script],
            env=cli_env(**{ENV_FAILPOINTS: "worker_stopped=1:stall"}),
            stderr=out,
        )
    try:
        # Idle: in RQ's loop, its stop signal handled (registered, it may not be there yet).
        wait_until(lambda: _idle(cluster) >= 1, timeout_s=60, message="no worker in its loop")
        stopped = time.monotonic()
        pool.send_signal(signal.SIGTERM)
        assert pool.wait(timeout=30) == 0  # a warm stop, as far as the user is concerned
    finally:
        if pool.poll() is None:
            pool.kill()
            pool.wait()
    assert time.monotonic() - stopped >= 1.0
    text = log.read_text()
    assert "runs no trial and is still up 1s after it was told to stop: stuck" in text, text
    # Where it hung, from its stacks:
    assert "plumbing/failpoints.py" in text and "in hit" in text, text
    assert "all workers stopped" in text, text


def _terminal_pool(cluster: Cluster, log: Path) -> TerminalPool:
    """One worker process, run as from a terminal (a Ctrl-C reaches its process group)."""
    pool = TerminalPool(
        cluster.server.url,
        cluster.prefix,
        ["--count", "1", "--lease-ttl", str(LEASE_TTL_S)],
        log=log,
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(cluster.state)),
        module="tests.support.fault_objectives",
    )
    pool.wait_ready(cluster.conn, 1)
    return pool


def test_one_ctrl_c_lets_the_running_trial_finish_and_says_what_the_next_does(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.start_broker()
    pool = _terminal_pool(cluster, tmp_path / "pool.log")
    try:
        name = cluster.submit("steady", n_trials=1, concurrency=1, hold_s=2.0)
        wait_calls(cluster, 1)
        wait_until(lambda: "started in pid" in pool.text(), timeout_s=10)
        pool.ctrl_c()
        assert pool.wait(timeout_s=30) == 0, pool.text()
    finally:
        if pool.process.poll() is None:
            pool.kill()

    (trial,) = cluster.check(name, complete=1, cap=1, failed=0)
    assert trial.duration is not None and trial.duration.total_seconds() >= 2.0
    text = pool.text()
    assert (
        "Ctrl-C: warm shutdown, 1 worker stopping, 1 once its running trial ends; "
        "press Ctrl-C again for a cold shutdown (kills them now; the broker retries their trials)"
    ) in text, text
    assert "SIGTERM" not in text and "stuck" not in text and STACK_DUMP not in text, text
    assert pool.all_gone()


def test_a_second_ctrl_c_is_a_cold_shutdown_and_named_so(cluster: Cluster, tmp_path: Path) -> None:
    cluster.start_broker()
    pool = _terminal_pool(cluster, tmp_path / "pool.log")
    try:
        name = cluster.submit("steady", n_trials=1, concurrency=1, hold_s=4.0)
        wait_calls(cluster, 1)
        wait_until(lambda: "started in pid" in pool.text(), timeout_s=10)
        pool.ctrl_c()
        wait_until(lambda: "Ctrl-C: warm shutdown" in pool.text(), timeout_s=10)  # it landed
        pool.ctrl_c()
        assert pool.wait(timeout_s=30) == 1, pool.text()
    finally:
        if pool.process.poll() is None:
            pool.kill()
    assert "a second Ctrl-C: cold shutdown, killing 1 worker now" in pool.text(), pool.text()
    assert pool.all_gone()
    cluster.start_workers(1)

    trials = cluster.check(name, complete=1, cap=1, failed=1)
    lost = next(t for t in trials if t.state is TrialState.FAIL)
    assert lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost"
    error = lost.user_attrs[FAIL_ERROR_ATTR]
    assert "killed by its pool's cold shutdown (a second Ctrl-C)" in error, error
    assert "SIGTERM" not in error, error
