"""Redis killed and restarted (AOF), down for a while, or back empty."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.dispatch import RETRY_OF_ATTR
from optuna_rq.verdict import FAIL_REASON_ATTR
from tests.faults.conftest import Cluster, RedisServer, wait_calls
from tests.helpers import wait_until

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


def test_the_python_api_rides_out_a_redis_outage(
    cluster: Cluster, aof_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="optuna_rq.connection")
    cluster.start_workers(2)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler())
    optimizer = Optimizer(
        "tests.fault_objectives:steady",
        concurrency=2,
        n_trials=10,
        study=study,
        redis_url=aof_redis.url,
        prefix=cluster.prefix,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            optimizer.run(
                x=suggest.float(0, 1), redis_url=aof_redis.url, key=cluster.key, hold_s=0.3
            )
        except BaseException as exc:  # the test thread reports it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_calls(cluster, 3)
    aof_redis.kill()
    time.sleep(5.0)  # the outage itself
    aof_redis.start()
    thread.join(timeout=120)

    assert not thread.is_alive() and not errors, errors
    assert any("Redis is back" in r.getMessage() for r in caplog.records), "no outage seen"
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 10, states
    assert TrialState.RUNNING not in states
