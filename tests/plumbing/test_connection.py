"""optuna_rq.plumbing.connection against real redis-server processes."""

from __future__ import annotations

import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError, TimeoutError

from optuna_rq.errors import ConfigError, OptunaRQError, RedisUnavailableError
from optuna_rq.plumbing.connection import HEALTH_CHECK_INTERVAL_S, connect, key, ping_or_raise
from optuna_rq.plumbing.embedded import (
    EmbeddedRedis,
    ensure_embedded,
    resolve_redis_url,
    stop_embedded,
)
from optuna_rq.plumbing.locations import ENV_REDIS_URL, ENV_STATE_DIR, redact_url, state_dir
from optuna_rq.plumbing.processes import exited
from tests.support.helpers import wait_until

ROOT = Path(__file__).resolve().parents[2]


def server_pid(url: str) -> int:
    client = connect(url)
    try:
        return int(client.info("server")["process_id"])
    finally:
        client.close()


# -- the embedded server ------------------------------------------------------------------


@pytest.mark.processes
def test_embedded_server_listens_only_on_a_private_socket_in_the_state_dir(
    embedded_state: Path,
) -> None:
    url = ensure_embedded(embedded_state)

    sock = embedded_state / "redis.sock"
    assert url == f"unix://{sock}"
    assert stat.S_ISSOCK(sock.stat().st_mode)
    assert stat.S_IMODE(sock.stat().st_mode) == 0o700
    client = connect(url)
    # CONFIG GET replies are decoded to str by redis-py even with decode_responses=False.
    assert client.config_get("port") == {"port": "0"}
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert Path(client.config_get("dir")["dir"]) == embedded_state.resolve()
    assert int((embedded_state / "redis.pid").read_text()) == server_pid(url)
    client.close()


@pytest.mark.processes
def test_a_running_server_is_reused(embedded_state: Path) -> None:
    url = ensure_embedded(embedded_state)
    pid = server_pid(url)

    assert ensure_embedded(embedded_state) == url
    assert server_pid(url) == pid
    assert EmbeddedRedis(embedded_state).pid() == pid


@pytest.mark.processes
def test_concurrent_starts_from_separate_processes_share_one_server(embedded_state: Path) -> None:
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from optuna_rq.plumbing.connection import connect\n"
        "from optuna_rq.plumbing.embedded import ensure_embedded\n"
        "url = ensure_embedded(Path(sys.argv[1]))\n"
        "print(url, connect(url).info('server')['process_id'])\n"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(embedded_state)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        results.append(out.split())

    assert len({tuple(r) for r in results}) == 1, results
    url, pid = results[0]
    assert url == f"unix://{embedded_state / 'redis.sock'}"
    assert EmbeddedRedis(embedded_state).pid() == int(pid)


@pytest.mark.processes
def test_stop_leaves_nothing_running(embedded_state: Path) -> None:
    pid = server_pid(ensure_embedded(embedded_state))

    assert stop_embedded(embedded_state) is True

    assert exited(pid)  # a zombie awaiting a reaper that is not us counts
    assert not (embedded_state / "redis.sock").exists()
    assert not (embedded_state / "redis.pid").exists()
    assert stop_embedded(embedded_state) is False


@pytest.mark.processes
def test_stop_kills_a_server_that_does_not_answer(embedded_state: Path) -> None:
    pid = server_pid(ensure_embedded(embedded_state))
    (embedded_state / "redis.sock").unlink()  # unreachable, but still running

    assert stop_embedded(embedded_state) is True
    assert exited(pid)


@pytest.mark.processes
def test_data_survives_a_restart(embedded_state: Path) -> None:
    url = ensure_embedded(embedded_state)
    client = connect(url)
    client.rpush("optuna-rq:queued", b"trial-1", b"trial-2")
    client.close()
    stop_embedded(embedded_state)

    client = connect(ensure_embedded(embedded_state))
    assert client.lrange("optuna-rq:queued", 0, -1) == [b"trial-1", b"trial-2"]
    client.close()


@pytest.mark.processes
def test_a_server_that_cannot_start_is_reported_with_its_log(embedded_state: Path) -> None:
    # The server cannot open its AOF: Redis 6 keeps it in appendonly.aof, Redis 7 and Valkey in
    # appendonlydir/.
    (embedded_state / "appendonly.aof").mkdir()
    (embedded_state / "appendonlydir").write_text("")

    started = time.monotonic()
    with pytest.raises(RedisUnavailableError, match="exited while starting") as info:
        ensure_embedded(embedded_state, timeout_s=8)

    assert time.monotonic() - started < 4, "a dead server is noticed before the deadline"
    assert re.search(
        r"Can't open (the append-only file|or create append-only dir)", str(info.value)
    )


@pytest.mark.processes
def test_a_socket_path_over_the_limit_names_the_fix() -> None:
    state = Path("/tmp") / ("x" * 120)

    with pytest.raises(ConfigError, match=ENV_STATE_DIR):
        ensure_embedded(state)
    assert not state.exists()


# -- URLs and clients ---------------------------------------------------------------------


def test_an_unreachable_url_fails_fast_without_the_password() -> None:
    url = "redis://user:secret@127.0.0.1:1/0"

    started = time.monotonic()
    with pytest.raises(RedisUnavailableError) as info:
        ping_or_raise(connect(url), url)

    assert time.monotonic() - started < 5
    message = str(info.value)
    assert "secret" not in message
    assert "redis://user:***@127.0.0.1:1/0" in message
    assert ENV_REDIS_URL in message and "--redis-url" in message
    assert isinstance(info.value, OptunaRQError)


def test_ping_or_raise_passes_on_a_live_server(redis_url: str, conn: redis.Redis) -> None:
    ping_or_raise(conn, redis_url)


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://user:secret@host:6379/0", "redis://user:***@host:6379/0"),
        ("rediss://:secret@host:6380/1", "rediss://:***@host:6380/1"),
        ("redis://user:p%40ss@host/0", "redis://user:***@host/0"),
        ("redis://user:se/cr@et@host", "redis://user:***@host"),
        ("redis://user@host/0", "redis://user@host/0"),
        ("unix:///tmp/r.sock?db=1&password=secret", "unix:///tmp/r.sock?db=1&password=***"),
        ("unix://user:secret@/tmp/r.sock", "unix://user:***@/tmp/r.sock"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_connect_configures_retries_with_jittered_exponential_backoff(redis_url: str) -> None:
    client = connect(redis_url, retries=7)

    retry = client.get_retry()
    assert retry is not None and retry.get_retries() == 7
    assert isinstance(retry._backoff, ExponentialWithJitterBackoff)
    kwargs = client.connection_pool.connection_kwargs
    assert set(kwargs["retry_on_error"]) == {ConnectionError, TimeoutError}
    assert kwargs["health_check_interval"] == HEALTH_CHECK_INTERVAL_S
    assert kwargs["decode_responses"] is False
    connection = client.connection_pool.make_connection()
    assert connection.retry.get_retries() == 7
    assert {ConnectionError, TimeoutError} <= set(connection.retry._supported_errors)
    client.close()


def test_a_bad_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="http://x:\\*\\*\\*@host"):
        connect("http://x:secret@host")


def test_the_session_redis_stores_and_returns_bytes(conn: redis.Redis, prefix: str) -> None:
    conn.set(key(prefix, "greeting"), "hello")

    assert conn.get(key(prefix, "greeting")) == b"hello"


# -- keys, state dir, URL resolution ------------------------------------------------------


def test_key_joins_under_the_prefix() -> None:
    assert key("optuna-rq", "results", "abc") == "optuna-rq:results:abc"
    assert key("p") == "p"


@pytest.mark.parametrize("bad", ["", "has space", "tab\there"])
def test_key_rejects_a_bad_prefix(bad: str) -> None:
    with pytest.raises(ConfigError, match="prefix"):
        key(bad, "x")


def test_state_dir_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv(ENV_STATE_DIR, raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    assert state_dir() == tmp_path / "home" / ".local" / "state" / "optuna-rq"

    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert state_dir() == tmp_path / "xdg" / "optuna-rq"

    monkeypatch.setenv(ENV_STATE_DIR, str(tmp_path / "env"))
    assert state_dir() == tmp_path / "env"

    assert state_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert state_dir(str(tmp_path / "explicit2")) == tmp_path / "explicit2"

    for name in ("home/.local/state/optuna-rq", "xdg/optuna-rq", "env", "explicit"):
        created = tmp_path / name
        assert created.is_dir()
        assert stat.S_IMODE(created.stat().st_mode) & 0o077 == 0


@pytest.mark.processes
def test_resolve_redis_url_precedence(
    embedded_state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_REDIS_URL, "redis://from-env:6379/0")
    assert resolve_redis_url("redis://given:6379/0") == "redis://given:6379/0"
    assert resolve_redis_url(None) == "redis://from-env:6379/0"

    monkeypatch.delenv(ENV_REDIS_URL)
    url = resolve_redis_url(None, state=embedded_state)
    assert url == f"unix://{embedded_state / 'redis.sock'}"
    wait_until(lambda: connect(url).ping(), timeout_s=5, message="embedded server answers")
