"""The pool's /healthz (`optuna-rq workers --health-port`) follows its supervising loop: 200 while
the loop turns (a worker process killed and restarted included), 503 with the reason once the
loop is stuck while its HTTP thread lives on, nothing at all from a frozen pool. The image's
HEALTHCHECK command (deploy/Dockerfile) is run against the real pool and says the same."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import redis
from rq import Worker

from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.locations import DEFAULT_PREFIX
from optuna_rq.protocol import Keys, Signer, live_pools, trial_queue
from tests.conftest import redis_server
from tests.processes.test_metrics import free_port
from tests.support.helpers import wait_until
from tests.support.worker_processes import WorkersFactory, cli, cli_env, stop_process

pytestmark = pytest.mark.timeout(120)

STALL_LIMIT_S = 15
"""The stall limit of the outage test: above a turn of the loop that waits on Redis's retries."""
DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile"
IMAGE_HEALTH_PORT = 9100  # where the image's HEALTHCHECK asks


def probe(port: int, path: str = "/healthz", *, timeout_s: float = 5) -> tuple[int, str]:
    """(status, body) of GET `path`; (0, "") while nothing listens or nothing answers."""
    try:
        url = f"http://127.0.0.1:{port}{path}"
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, TimeoutError):
        return 0, ""


def image_healthcheck(port: int) -> int:
    """Run the Dockerfile's HEALTHCHECK command against `port`: its exit code."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    [line] = re.findall(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.MULTILINE)
    argv = json.loads(line)
    assert argv[0] == "bash", argv  # what the slim image has, no interpreter start
    assert str(IMAGE_HEALTH_PORT) in argv[-1]
    argv[-1] = argv[-1].replace(str(IMAGE_HEALTH_PORT), str(port))
    return subprocess.run(argv, timeout=30, capture_output=True).returncode


def test_a_turning_pool_is_alive_through_a_killed_worker_and_a_frozen_one_answers_nothing(
    workers_factory: WorkersFactory, redis_url: str, prefix: str
) -> None:
    port = free_port()
    workers_factory(1, args=("--health-port", str(port), "--stall-limit", "5"))
    assert probe(port) == (200, "ok\n") and image_healthcheck(port) == 0
    assert probe(port, "/metrics")[0] == 404  # the workers' metrics stay on their own ports

    # Idle for longer than the stall limit, the loop still turns: alive throughout.
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        assert probe(port) == (200, "ok\n")
        time.sleep(0.2)

    connection = connect(redis_url)
    queue = trial_queue(connection, Keys(prefix).trial_queue("tests.support.objectives", "default"))
    for _ in range(2):  # its worker process killed: the pool restarts it and stays alive
        [worker] = Worker.all(connection=connection, queue=queue)
        os.kill(worker.pid, signal.SIGKILL)
        wait_until(lambda w=worker: _restarted(connection, queue, w.pid), timeout_s=60)
        assert probe(port) == (200, "ok\n")

    # Frozen (SIGSTOP), the whole pool answers nothing: a probe's timeout is a failure too.
    [heartbeat] = live_pools(connection, Keys(prefix), Signer())
    pool = heartbeat.pid
    os.kill(pool, signal.SIGSTOP)
    try:
        assert probe(port, timeout_s=2) == (0, "")
        assert image_healthcheck(port) != 0
    finally:
        os.kill(pool, signal.SIGCONT)
    wait_until(lambda: probe(port) == (200, "ok\n"), timeout_s=30)
    connection.close()


def _restarted(connection: redis.Redis, queue: object, dead_pid: int) -> bool:
    workers = Worker.all(connection=connection, queue=queue)  # type: ignore[arg-type]
    return len(workers) == 1 and workers[0].pid != dead_pid


def test_a_stuck_pool_loop_fails_healthz_while_its_http_thread_answers(
    redis_url: str, prefix: str
) -> None:
    port = free_port()
    for turns in (1, 3):  # stuck at its first turn, and after a few
        pool = subprocess.Popen(
            cli("--redis-url", redis_url, "--prefix", prefix, "workers", "--count", "1")
            + [
                "--import",
                "tests.support.objectives",
                "--health-port",
                str(port),
                "--stall-limit",
                "2",
            ],
            env=cli_env(OPTUNA_RQ_FAILPOINTS=f"pool_turn={turns}:stall"),
        )
        try:
            wait_until(lambda: probe(port)[0] == 503, timeout_s=60)
            status, reason = probe(port)
            assert "pool's loop has not completed a turn" in reason, reason
            assert "(stall limit 2s)" in reason and reason.count("\n") == 1, reason
            assert image_healthcheck(port) != 0
            assert pool.poll() is None  # alive, and stuck: what a liveness probe is for
        finally:
            pool.kill()  # the stuck loop would never act on a SIGTERM; its children follow it
            pool.wait(timeout=30)
        wait_until(lambda: probe(port) == (0, ""), timeout_s=30)
    assert image_healthcheck(port) != 0  # nothing listens


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--metrics-port", "{port}", "--count", "2", "--health-port", "{port1}"), "worker 1"),
        (("--health-port", "{taken}"), "cannot listen on it"),
        (("--health-port", "{port}", "--stall-limit", "0"), "--stall-limit"),
    ],
    ids=["a-worker's-metrics-port", "taken", "no-stall-limit"],
)
def test_a_health_port_that_cannot_serve_is_a_usage_error(
    redis_url: str, prefix: str, args: tuple[str, ...], expected: str
) -> None:
    port = free_port(2)
    with socket.socket() as taken:
        taken.bind(("", 0))
        taken.listen()
        values = {"port": port, "port1": port + 1, "taken": taken.getsockname()[1]}
        result = subprocess.run(
            cli("--redis-url", redis_url, "--prefix", prefix, "workers")
            + ["--import", "tests.support.objectives"]
            + [a.format(**values) for a in args],
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr, result.stderr


def test_the_pool_stops_cleanly_with_its_health_port(redis_url: str, prefix: str) -> None:
    port = free_port()
    pool = subprocess.Popen(
        cli("--redis-url", redis_url, "--prefix", prefix, "workers", "--import")
        + ["tests.support.objectives", "--health-port", str(port)],
        env=cli_env(),
    )
    connection = connect(redis_url)
    wait_until(lambda: live_pools(connection, Keys(prefix), Signer()), timeout_s=60)
    connection.close()
    assert probe(port) == (200, "ok\n")
    assert stop_process(pool) == 0
    assert probe(port) == (0, "")  # its port closed with it


def test_a_pool_waiting_out_a_redis_outage_stays_alive(tmp_path: Path) -> None:
    """Redis gone (its process killed) for longer than the stall limit: the pool's loop turns on
    (its Redis errors are caught and retried), so its liveness probe never restarts it for an
    outage a restart would not cure; Redis back, it serves on. A turn then takes seconds (each
    Redis call retries with backoff before it gives up): the limit leaves room for that, as the
    default 60 s does."""
    server = redis_server()
    if server is None:
        pytest.skip("no redis-server or valkey-server to cut")
    redis_port, health_port = free_port(), free_port()

    def start_redis() -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [server, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL,
        )

    redis_process = start_redis()
    url = f"redis://127.0.0.1:{redis_port}/0"
    wait_until(lambda: _pings(url), timeout_s=30)
    pool = subprocess.Popen(
        cli("--redis-url", url, "workers", "--import", "tests.support.objectives")
        + ["--health-port", str(health_port), "--stall-limit", str(STALL_LIMIT_S)],
        env=cli_env(),
    )
    try:
        # Serving: its heartbeat is written (its /healthz answers from before it meets Redis).
        connection = connect(url)
        wait_until(lambda: live_pools(connection, Keys(DEFAULT_PREFIX), Signer()), timeout_s=60)
        connection.close()
        assert probe(health_port) == (200, "ok\n")
        redis_process.kill()
        redis_process.wait(timeout=30)
        deadline = time.monotonic() + STALL_LIMIT_S + 3  # an outage longer than the limit
        while time.monotonic() < deadline:
            assert probe(health_port) == (200, "ok\n")
            time.sleep(0.2)
        redis_process = start_redis()
        wait_until(lambda: _pings(url), timeout_s=30)
        assert probe(health_port) == (200, "ok\n") and pool.poll() is None
    finally:
        code = stop_process(pool, timeout_s=60)
        redis_process.kill()
        redis_process.wait(timeout=30)
    assert code == 0


def _pings(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()
