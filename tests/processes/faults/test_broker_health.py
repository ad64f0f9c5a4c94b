"""The broker's /healthz and /readyz follow its dispatch loop: a Redis outage makes it unready
(and not dead), a loop that stops turning makes it dead, while its HTTP thread answers on."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from optuna_rq.daemon.broker_health import BrokerHealth
from tests.processes.test_metrics import free_port
from tests.support.cluster import Cluster, RedisServer
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(120)


def probe(port: int, path: str) -> tuple[int, str]:
    """(status, body) of GET `path`; (0, "") while nothing listens."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except urllib.error.URLError:
        return 0, ""


def test_readiness_follows_redis_and_liveness_rides_out_the_outage(
    cluster: Cluster, aof_redis: RedisServer
) -> None:
    port = free_port()
    cluster.start_broker(args=("--metrics-port", str(port)))
    wait_until(lambda: probe(port, "/readyz") == (200, "ok\n"), timeout_s=30)
    assert probe(port, "/healthz") == (200, "ok\n")
    status, metrics = probe(port, "/metrics")
    assert status == 200 and "optuna_rq_desired_workers" in metrics

    aof_redis.kill()
    wait_until(lambda: probe(port, "/readyz")[0] == 503, timeout_s=30)
    status, reason = probe(port, "/readyz")
    assert reason.startswith("Redis is unreachable: ") and reason.count("\n") == 1, reason
    assert probe(port, "/healthz") == (200, "ok\n")  # waiting for Redis: a restart would not help

    aof_redis.start()
    wait_until(lambda: probe(port, "/readyz") == (200, "ok\n"), timeout_s=30)


def test_a_stalled_loop_fails_liveness_while_the_http_thread_answers(
    cluster: Cluster, aof_redis: RedisServer
) -> None:
    port = free_port()
    cluster.start_workers(1)
    broker = cluster.start_broker(
        failpoints="before_tell=1:stall", args=("--metrics-port", str(port), "--stall-limit", "2")
    )
    wait_until(lambda: probe(port, "/healthz") == (200, "ok\n"), timeout_s=30)
    cluster.submit("steady", n_trials=2, concurrency=1)  # its first result stalls the loop

    wait_until(lambda: probe(port, "/healthz")[0] == 503, timeout_s=60)
    status, reason = probe(port, "/healthz")
    assert "has not completed a turn" in reason and "stall limit 2s" in reason, reason
    assert probe(port, "/readyz")[0] == 503
    assert probe(port, "/metrics")[0] == 200  # the HTTP thread lives on: it is not the probe
    broker.kill()  # the stalled loop would never see a SIGTERM
    broker.wait(timeout=10)


def test_a_broker_is_unready_until_it_serves_and_once_it_stopped() -> None:
    health = BrokerHealth(stall_limit_s=30)
    assert health.readiness() == "the broker has not started serving yet"
    assert health.liveness() is None  # starting up is being alive
    health.serving()
    assert health.readiness() is None
    health.stopped("lost the broker lock: another broker took over")
    assert health.readiness() == "lost the broker lock: another broker took over"
