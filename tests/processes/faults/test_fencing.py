"""Fenced writes: every write of the broker runs inside its fence script, and a broker that lost
its lock (frozen past its TTL while another took over) writes nothing more when it wakes."""

from __future__ import annotations

import random
import signal
import subprocess
import uuid
from pathlib import Path

import pytest
from optuna.trial import TrialState
from rq import Worker

from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import Keys, trial_queue
from tests.support.cluster import LEASE_TTL_S, Cluster
from tests.support.fencing import DualRedis, Monitor, WriteFlags, broker_writes, lock_keys
from tests.support.fencing import dual_redis as dual_redis  # the fixture
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, start_broker, stop_process

pytestmark = pytest.mark.timeout(600)

LOCK_TTL_S = 1.5
"""The brokers' lock TTL here: a frozen broker loses its lock this long after its last renewal."""

# What the workload below makes the broker write: if one is missing, the workload no longer
# exercises what the test claims to check.
EXPECTED = {"XREADGROUP", "XACK", "XDEL", "HSET", "LTRIM", "SET", "PEXPIRE", "DEL", "RPUSH"}


def _run(url: str, prefix: str, state: Path, *args: str) -> str:
    done = subprocess.run(
        cli("--redis-url", url, "--prefix", prefix, *args),
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(state)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_write_of_the_broker_runs_inside_its_fence(
    dual_redis: DualRedis, tmp_path: Path
) -> None:
    """Submit, remote-trial calls, a worker killed mid-trial (a retry), enqueue, set, cancel,
    delete, status and a clean stop, with MONITOR on: every write command from the broker's
    connections ran inside the fence script."""
    url, prefix, state = dual_redis.tcp_url, f"f{uuid.uuid4().hex[:8]}", tmp_path / "state"
    state.mkdir()
    conn = connect(url)
    key = f"{prefix}:obj"
    with Monitor(url) as monitor:
        workers = subprocess.Popen(
            cli("--redis-url", url, "--prefix", prefix, "workers", "--count", "3")
            + [
                "--import",
                "tests.support.fault_objectives",
                "--import",
                "tests.support.trial_objectives",
            ]
            + ["--lease-ttl", str(LEASE_TTL_S)],
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(state)),
        )
        queue = trial_queue(conn, Keys(prefix).trial_queue("tests.support.trial_objectives"))
        wait_until(lambda: len(Worker.all(connection=conn, queue=queue)) >= 3, timeout_s=60)
        log = tmp_path / "broker.log"
        with open(log, "wb") as err:
            broker = start_broker(
                dual_redis.url, prefix, state, "--lock-ttl", str(LOCK_TTL_S), stderr=err
            )
        try:

            def submit(objective: str, name: str, n_trials: int, *extra: str) -> None:
                args = ("--study-name", name, "--n-trials", str(n_trials), "--concurrency", "2")
                args += ("--sampler", "random", *extra)
                _run(url, prefix, state, "submit", objective, *args)

            marker = f"marker={tmp_path / 'died'}"
            submit("tests.support.trial_objectives:dies_once", "dies", 4, "--param", marker)
            submit("tests.support.trial_objectives:surface_single", "calls", 3)
            steady = ("--param", "x={type: float, low: 0, high: 1}", "--param", f"key={key}")
            steady += ("--param", f"redis_url={url}", "--param", "hold_s=0.5")
            submit("tests.support.fault_objectives:steady", "slow", 1000, *steady)
            sets = tmp_path / "sets.yaml"
            sets.write_text("[{x: 0.25}]\n")
            _run(url, prefix, state, "enqueue", "slow", str(sets))
            _run(url, prefix, state, "set", "slow", "--concurrency", "1")
            for name in ("dies", "calls"):
                _run(url, prefix, state, "wait", name, "--timeout", "120")
            _run(url, prefix, state, "cancel", "slow")
            wait_until(
                lambda: b"cancelled" in (conn.hget(f"{prefix}:status", "slow") or b""), timeout_s=60
            )
            _run(url, prefix, state, "delete", "slow")
            _run(url, prefix, state, "status")
        finally:
            assert stop_process(broker) == 0
            stop_process(workers)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]

    writes = broker_writes(monitor.entries, WriteFlags(url), lock_keys(prefix))
    assert not writes.unfenced, writes.unfenced
    assert EXPECTED <= set(writes.fenced), sorted(writes.fenced)
    print(
        f"\n  {writes.scripts} fence scripts ran {sum(writes.fenced.values())} writes: "
        f"{dict(sorted(writes.fenced.items()))}"
    )


def test_a_broker_frozen_past_its_lock_ttl_writes_nothing_when_it_wakes(
    cluster: Cluster, tmp_path: Path
) -> None:
    """Split brain, 20 times: SIGSTOP the broker past its lock TTL, start another that takes
    over, SIGCONT the first. Every trial told once, none left RUNNING, no attempt run twice, and
    the woken broker exits naming the cause."""
    lock = f"{cluster.prefix}:broker"
    args = ("--lock-ttl", str(LOCK_TTL_S))
    cluster.start_workers(3)
    log = tmp_path / "broker-0.log"
    broker = cluster.start_broker(log=log, args=args)
    rng = random.Random(25)
    for round_ in range(20):
        # Frozen anywhere from its first trial to its last.
        target = len(cluster.started()) + rng.randint(1, 11)
        name = cluster.submit("steady", n_trials=12, concurrency=3, hold_s=0.5)
        wait_until(lambda: len(cluster.started()) >= target, timeout_s=60)  # noqa: B023
        broker.send_signal(signal.SIGSTOP)
        wait_until(lambda: not cluster.conn.exists(lock), timeout_s=30, interval_s=0.05)
        next_log = tmp_path / f"broker-{round_ + 1}.log"
        successor = cluster.start_broker(log=next_log, args=args)
        broker.send_signal(signal.SIGCONT)

        assert broker.wait(timeout=60) == 1, f"round {round_}"
        text = log.read_text()
        assert "lost the broker lock" in text and "Traceback" not in text, text[-3000:]
        trials = cluster.check(name, complete=12, cap=3, failed=0)
        assert not [t for t in trials if t.state is TrialState.RUNNING]
        calls = cluster.calls()
        assert len(calls) == 12 * (round_ + 1) and set(calls.values()) == {1}, calls
        broker, log = successor, next_log
