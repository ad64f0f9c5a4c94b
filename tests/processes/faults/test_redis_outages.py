"""Redis killed and restarted (AOF), down for a while, or back empty."""

from __future__ import annotations

import json
import logging
import random
import signal
import subprocess
import time
import uuid
from pathlib import Path

import optuna
import pytest
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_rq.dispatch import RETRY_OF_ATTR
from optuna_rq.plumbing.connection import connect
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from tests.support.cluster import LEASE_TTL_S, Cluster, RedisServer, start_optimizer
from tests.support.fencing import DualRedis, Monitor, WriteFlags, broker_writes, lock_keys
from tests.support.fencing import dual_redis as dual_redis  # the fixture
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, start_broker, stop_process

pytestmark = pytest.mark.timeout(180)


@pytest.mark.parametrize("outage_s", [0.0, 10.0], ids=["restart", "10s-outage"])
def test_the_study_completes_across_a_redis_kill_and_restart(
    cluster: Cluster, aof_redis: RedisServer, outage_s: float
) -> None:
    cluster.start_workers(2)
    cluster.start_broker()
    name = cluster.submit("steady", n_trials=12, concurrency=2, hold_s=0.5)
    wait_until(lambda: cluster.status(name).get("complete", 0) >= 3, timeout_s=60)
    aof_redis.kill()
    time.sleep(outage_s)  # the outage itself: nothing to poll for while Redis is down
    aof_redis.start()

    trials = cluster.check(name, complete=12, cap=2)
    lost = [t for t in trials if t.state is TrialState.FAIL]
    assert all(t.user_attrs[FAIL_REASON_ATTR] == "worker_lost" for t in lost), lost
    retried = {t.user_attrs[RETRY_OF_ATTR] for t in trials if RETRY_OF_ATTR in t.user_attrs}
    assert retried == {t.number for t in lost}, "a lost attempt was not retried"


def test_a_redis_back_empty_stops_the_broker_naming_the_cause(
    cluster: Cluster, aof_redis: RedisServer, tmp_path: Path
) -> None:
    cluster.start_workers(1)
    log = tmp_path / "broker.log"
    broker = cluster.start_broker(log=log)
    name = cluster.submit("steady", n_trials=50, concurrency=2, hold_s=0.2)
    wait_until(lambda: cluster.status(name).get("complete", 0) >= 2, timeout_s=60)
    aof_redis.kill()
    aof_redis.wipe()
    aof_redis.start()

    assert broker.wait(timeout=60) == 1
    text = log.read_text()
    assert "Redis lost its data" in text and "appendonly yes" in text, text[-2000:]
    assert "Traceback" not in text, text[-2000:]
    trials = cluster.trials(name)
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    tells = cluster.tells()
    assert all(tells[t._trial_id] == 1 for t in trials)
    assert not cluster.conn.exists(f"{cluster.prefix}:status"), "the broker wrote on"


@pytest.mark.timeout(900)
def test_a_redis_restarted_empty_under_a_frozen_broker_gets_no_write_from_it(
    dual_redis: DualRedis, tmp_path: Path
) -> None:
    """A broker frozen (SIGSTOP) mid-study while its Redis restarts empty, then woken, 20 times:
    MONITOR sees no write from it on the new Redis (its fence script refuses them all), it exits
    naming the cause, and its storage holds every trial told once, none RUNNING."""
    url, prefix = dual_redis.tcp_url, f"f{uuid.uuid4().hex[:8]}"
    key = f"{prefix}:obj"
    workers = subprocess.Popen(
        cli("--redis-url", url, "--prefix", prefix, "workers", "--count", "3")
        + ["--import", "tests.support.fault_objectives", "--lease-ttl", str(LEASE_TTL_S)],
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(tmp_path)),
    )
    conn = connect(url, retries=40)
    rng = random.Random(25)
    try:
        for round_ in range(20):
            state = tmp_path / f"state-{round_}"
            state.mkdir()
            log = tmp_path / f"broker-{round_}.log"
            with open(log, "wb") as err:
                broker = start_broker(dual_redis.url, prefix, state, stderr=err)
            target = rng.randint(1, 8)  # frozen anywhere from its first trial to its last
            name = _submit(url, prefix, state, key, n_trials=12)
            wait_until(lambda: conn.llen(f"{key}:started") >= target, timeout_s=60)  # noqa: B023
            broker.send_signal(signal.SIGSTOP)
            dual_redis.kill()
            dual_redis.wipe()
            dual_redis.start()
            with Monitor(url) as monitor:
                broker.send_signal(signal.SIGCONT)
                assert broker.wait(timeout=60) == 1, f"round {round_}"

            writes = broker_writes(monitor.entries, WriteFlags(url), lock_keys(prefix))
            assert not writes.fenced and not writes.unfenced, writes
            text = log.read_text()
            assert "Redis lost its data" in text and "appendonly yes" in text, text[-2000:]
            assert "Traceback" not in text, text[-2000:]
            journal = JournalStorage(JournalFileBackend(str(state / "studies.journal")))
            trials = optuna.load_study(study_name=name, storage=journal).trials
            assert trials and not [t for t in trials if not t.state.is_finished()], trials
            tells = _tells(state / "studies.journal")
            assert all(tells[t._trial_id] == 1 for t in trials), tells
    finally:
        stop_process(workers)
        conn.close()


def _submit(url: str, prefix: str, state: Path, key: str, *, n_trials: int) -> str:
    name = f"steady-{uuid.uuid4().hex[:6]}"
    params = ["--param", "x={type: float, low: 0, high: 1}", "--param", f"redis_url={url}"]
    params += ["--param", f"key={key}", "--param", "hold_s=0.5"]
    done = subprocess.run(
        cli(
            "--redis-url",
            url,
            "--prefix",
            prefix,
            "submit",
            "tests.support.fault_objectives:steady",
        )
        + ["--study-name", name, "--n-trials", str(n_trials), "--concurrency", "3"]
        + ["--sampler", "random", *params],
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(state)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return name


_FINISHED = {TrialState.COMPLETE.value, TrialState.PRUNED.value, TrialState.FAIL.value}


def _tells(journal: Path) -> dict[int, int]:
    """How many times each trial id was set to a finished state, from the journal's log."""
    counts: dict[int, int] = {}
    for line in journal.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("op_code") == 6 and entry.get("state") in _FINISHED:
            counts[entry["trial_id"]] = counts.get(entry["trial_id"], 0) + 1
    return counts


def test_the_python_api_rides_out_a_redis_outage(
    cluster: Cluster, aof_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="optuna_rq.redis")
    cluster.start_workers(2)
    run = start_optimizer(cluster, hold_s=0.3)
    aof_redis.kill()
    time.sleep(5.0)  # the outage itself
    aof_redis.start()

    states = run.finished()
    assert any(" is back after " in r.getMessage() for r in caplog.records), "no outage seen"
    assert states.count(TrialState.COMPLETE) == 10, states
    assert TrialState.RUNNING not in states
