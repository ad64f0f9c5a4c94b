"""`optuna-rq redis stop` leaves the embedded redis-server running while something uses it (a
broker serving a prefix on it, a worker pool with a live heartbeat, any other client), exits 1
naming them, and stops it only when nothing does, or with --force. Real processes on a real
embedded server."""

from __future__ import annotations

import contextlib
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from optuna_rq.plumbing.embedded import EmbeddedRedis
from optuna_rq.plumbing.processes import exited
from tests.conftest import redis_server
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, stop_process

pytestmark = pytest.mark.timeout(180)

PREFIX = "optuna-rq"  # the default: what a broker and workers started with no options use


@pytest.fixture
def env(embedded_state: Path) -> dict[str, str]:
    if redis_server() is None:
        pytest.skip("no redis-server binary for an embedded server")
    environ = cli_env(OPTUNA_RQ_STATE_DIR=str(embedded_state))
    environ.pop("OPTUNA_RQ_REDIS_URL", None)  # the embedded server, as a user without one
    return environ


@pytest.fixture
def server(embedded_state: Path) -> Iterator[redis.Redis]:
    client = EmbeddedRedis(embedded_state).client(timeout_s=5.0)
    yield client
    client.close()


def _command(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli(*args), env=env, capture_output=True, text=True, timeout=60)


def _alone(server: redis.Redis) -> bool:
    """Nothing but this test's own connection is on the server."""
    return len(server.client_list()) == 1


def _refused(env: dict[str, str], state: Path) -> str:
    """`redis stop`, refused: its one line, the server still running."""
    pid = EmbeddedRedis(state).pid()
    result = _command(env, "redis", "stop")
    assert result.returncode == 1, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: the embedded redis-server under {state} is in use: "), line
    assert line.endswith("Stop them first, or pass --force"), line
    assert pid is not None and not exited(pid) and EmbeddedRedis(state).answers()
    return line


def test_redis_stop_refuses_while_a_broker_workers_or_a_client_use_it(
    env: dict[str, str], embedded_state: Path, server: redis.Redis
) -> None:
    host = socket.gethostname()
    broker = subprocess.Popen(cli("broker"), env=env, stderr=subprocess.DEVNULL)
    pool = None
    try:
        wait_until(lambda: EmbeddedRedis(embedded_state).answers(), timeout_s=30)
        wait_until(lambda: server.exists(f"{PREFIX}:broker:turn"), timeout_s=30)
        line = _refused(env, embedded_state)
        assert f"the broker of prefix {PREFIX!r} ({host}:{broker.pid})" in line, line

        pool = subprocess.Popen(
            cli("workers", "--import", "tests.support.objectives", "--count", "1"),
            env=env,
            stderr=subprocess.DEVNULL,
        )
        heartbeat = f"{PREFIX}:pool:{host}.{pool.pid}.*"  # its id: host.pid.random
        wait_until(lambda: any(server.scan_iter(match=heartbeat)), timeout_s=60)
        # The pool's parent beats before its worker process names its connection (RQ's worker
        # does, as it is made): wait for that name too, or the line is read between the two.
        wait_until(lambda: any(c.get("name") for c in server.client_list()), timeout_s=60)
        line = _refused(env, embedded_state)
        assert f"1 worker pool of prefix {PREFIX!r} ({host}.{pool.pid}." in line, line
        assert f"the broker of prefix {PREFIX!r}" in line, line
        assert "other client connections (" in line, line  # the workers' named connections

        assert stop_process(pool) == 0 and stop_process(broker) == 0
        wait_until(lambda: _alone(server), timeout_s=30)
        line = _refused(env, embedded_state)  # this test's own connection is a client too
        assert line.endswith("in use: 1 other client connection. Stop them first, or pass --force")
    finally:
        for process in (pool, broker):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()

    pid = EmbeddedRedis(embedded_state).pid()
    server.close()
    stopped = _command(env, "redis", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert stopped.stderr.strip() == f"stopped the embedded redis-server under {embedded_state}"
    assert pid is not None and exited(pid)


def test_redis_stop_force_stops_it_in_use(env: dict[str, str], embedded_state: Path) -> None:
    url = EmbeddedRedis(embedded_state).ensure()
    pid = EmbeddedRedis(embedded_state).pid()
    with contextlib.closing(redis.Redis.from_url(url)) as user:
        user.ping()
        assert "1 other client connection" in _refused(env, embedded_state)
        forced = _command(env, "redis", "stop", "--force")
        assert forced.returncode == 0, forced.stderr
        assert "stopped the embedded redis-server" in forced.stderr
    assert pid is not None and exited(pid)
