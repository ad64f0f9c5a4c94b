"""A Redis behind Sentinel (`redis+sentinel://`), against real servers: a primary, a replica and
three sentinels, all with a password. Every role reaches it through the URL alone, and a study
rides out the primary's SIGKILL, failover after failover: it ends exact (every trial told once,
each COMPLETE trial's objective really ran), or the broker stops with the data-loss message.

The sentinels run the suite's server binary in sentinel mode (`redis-server sentinel.conf
--sentinel`), else Debian's `redis-sentinel`; without either, the tests skip saying so.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psutil
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.errors import ConfigError, RedisUnavailableError
from optuna_rq.plumbing.connection import connect, derived_pool, ping_or_raise
from optuna_rq.plumbing.locations import redact_url
from optuna_rq.protocol import Keys
from optuna_rq.sampling import SAMPLES_TO_DECIDE
from tests.conftest import redis_server
from tests.processes.test_redis_auth import certificates, tls_capable_server
from tests.support import source_trees
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(150)

SERVICE = "orq"
PASSWORD = "p@ss/w:rd#1"
"""Every character here would break, or be cut at, in a URL unescaped: it is given apart."""
DOWN_AFTER_MS = 2000
"""Short, for a fast test; not much shorter: a loaded machine's new primary, busy syncing its
replica, can miss a second of sentinel PINGs and be failed over again."""
FAILOVER_TIMEOUT_MS = 2000
INSTALL = "apt-get install -y redis-sentinel"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sentinel_commands(executable: str, conf: Path) -> list[list[str]]:
    """The ways to start a sentinel here: the server binary in sentinel mode (Redis and Valkey
    build it in), then Debian's `redis-sentinel`."""
    commands = [[executable, str(conf), "--sentinel"]]
    packaged = shutil.which("redis-sentinel")
    if packaged is not None:
        commands.append([packaged, str(conf)])
    return commands


class SentinelSet:
    """A primary and a replica (`redis-server`, no persistence: what a failover keeps is what was
    replicated) and three sentinels watching them (quorum 2), on 127.0.0.1, all requiring
    `PASSWORD`. `url` names them as a client does."""

    def __init__(self, executable: str, directory: Path, *, tls: bool = False) -> None:
        self.executable = executable
        self.directory = directory
        self.tls = tls
        """Everything speaks TLS only, with the certificates `certificates` made in `directory`."""
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        if self.tls:
            ca = self.directory / "ca.crt"
            return f"rediss+sentinel://{hosts}/{SERVICE}?sentinel_auth=same&ssl_ca_certs={ca}"
        return f"redis+sentinel://{hosts}/{SERVICE}?sentinel_auth=same"

    def _tls_settings(self) -> list[str]:
        """The TLS directives (`--name value` pairs without the dashes), listening on no plain
        port; replication and the sentinels' own links use TLS too."""
        if not self.tls:
            return []
        return [
            *("tls-cert-file", str(self.directory / "server.crt")),
            *("tls-key-file", str(self.directory / "server.key")),
            *("tls-ca-cert-file", str(self.directory / "ca.crt")),
            *("tls-auth-clients", "no", "tls-replication", "yes"),
        ]

    def start(self) -> None:
        primary, replica = _free_port(), _free_port()
        self.start_server(primary)
        self.start_server(replica, replica_of=primary)
        for _ in range(3):
            self.start_sentinel(_free_port(), primary)
        sentinel = self._sentinel_client(next(iter(self.sentinels)))

        def watching() -> bool:
            state: dict[str, Any] = sentinel.sentinel_master(SERVICE)
            return int(state["num-other-sentinels"]) == 2 and int(state["num-slaves"]) == 1

        wait_until(watching, timeout_s=30, message="the sentinels did not find each other")
        self.wait_whole()

    def start_server(self, port: int, *, replica_of: int | None = None) -> None:
        """Start a server on `port`, empty: a replica's dump of its last sync is not kept, or a
        restart would load it (an older state, which no check can tell from the current one)."""
        data = self.directory / str(port)
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        argv = [self.executable, "--bind", "127.0.0.1", "--dir", str(data)]
        argv += ["--port", "0", "--tls-port", str(port)] if self.tls else ["--port", str(port)]
        settings = self._tls_settings()
        for name, value in zip(settings[::2], settings[1::2], strict=True):
            argv += [f"--{name}", value]
        argv += ["--save", "", "--appendonly", "no", "--logfile", str(data / "redis.log")]
        argv += ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
        argv += ["--repl-diskless-sync-delay", "0"]  # a replica syncs at once
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        client = self._client(port)
        wait_until(lambda: _answers(client), timeout_s=15, message=f"server {port} did not start")

    def start_sentinel(self, port: int, primary: int) -> None:
        conf = self.directory / f"sentinel-{port}.conf"
        quoted = '"' + PASSWORD + '"'
        settings = self._tls_settings()
        tls = "".join(f"{n} {v}\n" for n, v in zip(settings[::2], settings[1::2], strict=True))
        listen = f"port 0\ntls-port {port}\n{tls}" if self.tls else f"port {port}\n"
        conf.write_text(
            f"{listen}bind 127.0.0.1\ndir {self.directory}\n"
            f"logfile {self.directory / f'sentinel-{port}.log'}\n"
            f"requirepass {quoted}\nsentinel sentinel-pass {quoted}\n"
            f"sentinel monitor {SERVICE} 127.0.0.1 {primary} 2\n"
            f"sentinel auth-pass {SERVICE} {quoted}\n"
            f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
            f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        )
        client = self._sentinel_client(port)
        for argv in _sentinel_commands(self.executable, conf):
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until(
                lambda p=process: p.poll() is not None or _answers(client),
                timeout_s=15,
                message=f"sentinel {port} did not start",
            )
            if process.poll() is None:
                self.sentinels[port] = process
                return
        reason = (
            f"no Redis Sentinel here ({self.executable} does not run one, and there is no "
            f"redis-sentinel): {INSTALL}"
        )
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (required in CI)")
        pytest.skip(reason)

    def _client(self, port: int, **settings: Any) -> redis.Redis:
        if self.tls:
            settings |= {"ssl": True, "ssl_ca_certs": str(self.directory / "ca.crt")}
        return redis.Redis(
            host="127.0.0.1", port=port, password=PASSWORD, socket_timeout=2, **settings
        )

    def _sentinel_client(self, port: int) -> redis.Redis:
        return self._client(port, decode_responses=True)

    def primary(self) -> int:
        """The primary's port, as the sentinels say (each asked until one answers)."""
        for port in self.sentinels:
            try:
                _host, primary = self._sentinel_client(port).sentinel_get_master_addr_by_name(
                    SERVICE
                )
                return int(primary)
            except redis.RedisError:
                continue
        raise AssertionError("no sentinel answers")

    def kill_primary(self) -> int:
        """SIGKILL the primary (nothing it did not replicate survives); its port."""
        port = self.primary()
        self.servers[port].send_signal(signal.SIGKILL)
        self.servers[port].wait(timeout=10)
        return port

    def wait_failover(self, old: int) -> int:
        """Wait until the sentinels name another primary and it takes writes; its port."""

        def promoted() -> int | None:
            port = self.primary()
            if port == old:
                return None
            try:
                role = self._client(port).info("replication")["role"]
            except redis.RedisError:
                return None
            return port if role == "master" else None

        wait_until(promoted, timeout_s=30, message="the sentinels did not fail over")
        return self.primary()

    def wait_whole(self) -> None:
        """Wait until the set is whole again: every sentinel names the same primary, and every
        other server is its replica, in sync, that every sentinel could promote. (Under load a
        sentinel may fail over a second time, from a primary that answered late: this waits
        that out too.)"""

        def whole() -> bool:
            try:
                named = {
                    self._sentinel_client(s).sentinel_get_master_addr_by_name(SERVICE)[1]
                    for s in self.sentinels
                }
                if len(named) != 1:
                    return False
                primary = int(named.pop())
                if self._client(primary).info("replication")["role"] != "master":
                    return False
                for port in self.servers:
                    if port == primary:
                        continue
                    info = self._client(port).info("replication")
                    if (
                        info.get("master_port") != primary
                        or info.get("master_link_status") != "up"
                        or info["master_sync_in_progress"]
                    ):
                        return False
                    for sentinel in self.sentinels:
                        replicas = self._sentinel_client(sentinel).sentinel_slaves(SERVICE)
                        mine = [r for r in replicas if int(r["port"]) == port]
                        if not mine or mine[0]["is_sdown"] or mine[0]["is_odown"]:
                            return False
                return True
            except redis.RedisError:
                return False

        try:
            wait_until(whole, timeout_s=45, interval_s=0.1)
        except AssertionError:
            logs = sorted(self.directory.glob("*/redis.log"))
            tails = "\n".join(f"{p}:\n{p.read_text()[-2000:]}" for p in logs)
            raise AssertionError(f"the Sentinel set did not become whole:\n{tails}") from None

    def set_down_after(self, ms: int) -> None:
        """How long every sentinel waits before it calls a silent primary down."""
        for port in self.sentinels:
            self._sentinel_client(port).sentinel_set(SERVICE, "down-after-milliseconds", ms)

    def stop(self) -> None:
        for process in [*self.sentinels.values(), *self.servers.values()]:
            if process.poll() is None:
                process.terminate()
        for process in [*self.sentinels.values(), *self.servers.values()]:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


ROOT = Path(__file__).resolve().parents[2]
_MAKES_A_CLIENT = re.compile(
    r"(^|\.)(Redis|StrictRedis|\w*ConnectionPool|\w*Connection|_?Sentinel\w*|from_url|from_pool"
    r"|master_for|slave_for|replica_for)$"
)
"""What a call (or an alias of a constructor) that makes a Redis client, pool or connection
looks like: redis-py's constructors and factories."""
CLIENT_SITES = {
    (
        "broker/plumbing/connection.py",
        "_plain_client",
    ): "redis.Redis.from_url: THE path, for connect",
    (
        "broker/plumbing/connection.py",
        "derived_pool",
    ): "redis.ConnectionPool from a client connect made",
    ("broker/plumbing/connection.py", "_probe_client"): "redis.Redis on a derived_pool",
    ("broker/plumbing/sentinel.py", "<module>"): "typed aliases of Sentinel and its pool",
    ("broker/plumbing/sentinel.py", "sentinel_client"): "Sentinel.master_for, for connect",
    ("broker/plumbing/sentinel.py", "derived_sentinel_pool"): "a Sentinel pool, for derived_pool",
    ("broker/daemon/fence.py", "FencedRedis.__init__"): "on the pool `around` passes",
    ("broker/daemon/fence.py", "FencedRedis.around"): "cls(connection_pool=derived_pool(...))",
    (
        "broker/plumbing/outages.py",
        "_server",
    ): "reads a pool's address to name its server: no client",
}
"""Every place in the package that makes a Redis client, a pool, or copies a pool's settings
(`connection_kwargs`): each one `connect` or `derived_pool` (so a Sentinel URL, a password
apart from the URL, TLS and the retries reach every role), or one of those two itself."""


class _ClientSites(ast.NodeVisitor):
    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.found: set[tuple[str, str]] = set()
        self.aliases: set[str] = set()

    def _enter(self, node: ast.AST, name: str) -> None:
        self.scope.append(name)
        self.generic_visit(node)
        self.scope.pop()

    def _found(self) -> None:
        self.found.add((self.path, ".".join(self.scope) or "<module>"))

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self._enter(node, node.name)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> None:
        self._enter(node, node.name)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if (node.module or "").split(".")[0] == "redis":
            for name in node.names:
                if _MAKES_A_CLIENT.search(name.name) and name.asname:
                    self.aliases.add(name.asname)  # `from redis import Redis as R`: R(...)

    def visit_Call(self, node: ast.Call) -> None:
        callee = ast.unparse(node.func)
        keywords = {k.arg for k in node.keywords}
        if (
            _MAKES_A_CLIENT.search(callee)
            or callee in self.aliases
            or keywords & {"unix_socket_path", "connection_pool", "connection_class"}
        ):
            self._found()
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if node.attr == "connection_kwargs":  # a pool's settings, copied into another
            self._found()
        self.generic_visit(node)

    def visit_Assign(self, node: ast.Assign) -> None:
        self._alias(node.value)
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._alias(node.value)
        self.generic_visit(node)

    def _alias(self, value: ast.expr) -> None:
        if isinstance(value, (ast.Name, ast.Attribute)) and _MAKES_A_CLIENT.search(
            ast.unparse(value)
        ):
            self._found()  # `make = redis.Redis`: a constructor under another name


def test_every_redis_client_is_made_by_connect_or_derived_from_one() -> None:
    found: set[tuple[str, str]] = set()
    for folder in ("broker", "workers"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            visitor = _ClientSites(str(path.relative_to(ROOT)))
            visitor.visit(source_trees.parse(path.read_text()))
            found |= visitor.found
    assert found == set(CLIENT_SITES), (
        "a Redis client made elsewhere than connection.connect / derived_pool: it would not "
        f"take a redis+sentinel:// URL; route it through them: {found ^ set(CLIENT_SITES)}"
    )


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:1/0", "unix:///nowhere/redis.sock", "redis+sentinel://h1,h2/s"]
)
def test_a_derived_pool_keeps_the_settings_and_takes_its_own_protocol(url: str) -> None:
    """The broker's fenced client speaks RESP2 on a pool derived from the one `connect` made,
    whatever the URL (redis-py's RESP3-only state is the new pool's to make), and the settings
    that make it reach the same server go with it."""
    conn = connect(url, password="pw", connect_timeout_s=3.0)
    pool = derived_pool(conn, protocol=2, socket_timeout=7.0)
    settings = pool.connection_kwargs
    assert settings["protocol"] == 2 and settings["socket_timeout"] == 7.0
    assert settings["password"] == "pw" and settings["socket_connect_timeout"] == 3.0
    assert pool.connection_class is conn.connection_pool.connection_class
    assert type(pool) is type(conn.connection_pool)


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    """One set for the module: the failover test leaves it whole (every server up, the replica
    in sync), with another primary, which no test assumes."""
    executable = redis_server()
    if executable is None:
        pytest.skip(f"no redis-server here: apt-get install -y redis-server ({INSTALL})")
    group = SentinelSet(executable, tmp_path_factory.mktemp("sentinels"))  # kept: their logs
    try:
        group.start()
        yield group
    finally:
        group.stop()


@pytest.fixture(scope="module")
def record() -> Iterator[str]:
    """A plain redis-server where the objectives record their calls: not the one that fails
    over, so the record keeps what the failover may lose."""
    executable = redis_server()
    assert executable is not None
    directory = Path(tempfile.mkdtemp(prefix="orqr", dir="/tmp"))
    sock = directory / "redis.sock"
    process = subprocess.Popen(
        [
            executable,
            "--port",
            "0",
            "--unixsocket",
            str(sock),
            "--save",
            "",
            "--dir",
            str(directory),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(unix_socket_path=str(sock), socket_timeout=1)
    wait_until(lambda: _answers(client), timeout_s=15, message="the record server did not start")
    yield f"unix://{sock}"
    process.terminate()
    process.wait(timeout=10)
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def password_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The password as a mounted secret: every process of the test reads it from here."""
    path = tmp_path / "redis-password"
    path.write_text(PASSWORD + "\n")
    monkeypatch.setenv("OPTUNA_RQ_REDIS_PASSWORD_FILE", str(path))
    return path


def _talks_to(pid: int, ports: set[int]) -> bool:
    """Whether process `pid` holds a TCP connection to one of `ports`."""
    try:
        connections = psutil.Process(pid).net_connections(kind="tcp")
    except psutil.NoSuchProcess:
        return False
    return any(c.raddr and c.raddr.port in ports for c in connections)


def _spawned(pid: int) -> list[int]:
    """The children `pid` started with multiprocessing's spawn (not its resource tracker)."""
    children = psutil.Process(pid).children()
    return [c.pid for c in children if "spawn_main" in " ".join(c.cmdline())]


def test_every_role_reaches_redis_through_the_sentinels(
    sentinels: SentinelSet, record: str, password_file: Path, tmp_path: Path
) -> None:
    """Broker (and its sampler process), a worker pool (and its children), the CLI and a remote
    Optimizer, given the Sentinel URL alone: each long-lived process asks a sentinel, and the
    study runs."""
    cluster = Cluster(sentinels, tmp_path, record_url=record)  # type: ignore[arg-type]
    cluster.conn = connect(sentinels.url, password=PASSWORD)
    try:
        broker = cluster.start_broker(
            args=("--off-loop-above", "0", "--log-level", "INFO"), log=tmp_path / "broker.log"
        )
        pool = cluster.start_workers(2, "fork")
        # The broker starts its sampler process on a first study, and moves the next there.
        log = tmp_path / "broker.log"
        cluster.submit("steady", n_trials=SAMPLES_TO_DECIDE, concurrency=2, hold_s=0.01)
        wait_until(lambda: "ready" in log.read_text(), timeout_s=60, message="no sampler process")
        name = cluster.submit("steady", n_trials=16, concurrency=2, hold_s=0.05)
        status = subprocess.run(
            cli("--redis-url", sentinels.url, "--prefix", cluster.prefix, "status", name),
            env=cli_env(),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert status.returncode == 0 and name in status.stdout, status.stderr
        asked = set(sentinels.sentinels)
        children = _spawned(pool.pid)
        assert len(children) == 2, children
        for pid in [broker.pid, pool.pid, *children]:
            wait_until(lambda pid=pid: _talks_to(pid, asked), timeout_s=30, message=str(pid))
        cluster.check(name, complete=16, cap=2)
        assert f"study {name!r} samples in the sampler process" in log.read_text()
        sampler = _spawned(broker.pid)
        assert len(sampler) == 1, "the broker started no sampler process"
        wait_until(lambda: _talks_to(sampler[0], asked), timeout_s=30, message="sampler")

        opt = Optimizer(
            "tests.support.fault_objectives:steady",
            2,
            4,
            redis_url=sentinels.url,
            prefix=cluster.prefix,
        )
        opt.run(x=suggest.float(0, 1), redis_url=record, key=cluster.key, hold_s=0.05)
        assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 4
    finally:
        cluster.stop_all()
    assert PASSWORD not in (tmp_path / "broker.log").read_text()


def test_a_wrong_sentinel_url_is_refused_naming_the_part_and_the_fix(
    sentinels: SentinelSet,
) -> None:
    hosts = ",".join(f"127.0.0.1:{port}" for port in sentinels.sentinels)
    with pytest.raises(ConfigError, match="no service name"):
        connect(f"redis+sentinel://{hosts}/")
    with pytest.raises(ConfigError, match="unknown option 'sentinel_pass'"):
        connect(f"redis+sentinel://{hosts}/{SERVICE}?sentinel_pass=x")
    # Sentinels that require a password, sent none: the probe says so, without the password.
    with pytest.raises(RedisUnavailableError, match="sentinel_auth=same") as refused:
        url = f"redis+sentinel://:{quote(PASSWORD, safe='')}@{hosts}/{SERVICE}"
        ping_or_raise(connect(url), url)
    assert PASSWORD not in str(refused.value)
    # A service the sentinels do not watch, and sentinels that do not answer: one line each,
    # naming the service and the sentinels asked (not redis-py's repr of every client it made).
    with pytest.raises(
        RedisUnavailableError, match="no sentinel monitors a primary named 'nope'"
    ) as unknown:
        url = f"redis+sentinel://{hosts}/nope?sentinel_auth=same"
        ping_or_raise(connect(url, password=PASSWORD), url)
    assert "<redis" not in str(refused.value) + str(unknown.value)
    with pytest.raises(RedisUnavailableError, match="failed with ConnectionError") as down:
        url = f"redis+sentinel://127.0.0.1:{_free_port()}/{SERVICE}"
        ping_or_raise(connect(url), url, timeout_s=0.5)
    assert f"no primary for service '{SERVICE}' from the sentinels at 127.0.0.1:" in str(down.value)
    assert "<redis" not in str(down.value)
    assert "***" in redact_url(f"redis+sentinel://u:{PASSWORD}@{hosts}/s?sentinel_password=x")


ROUNDS = 3
N_TRIALS = 9
CAP = 3


def test_a_study_rides_out_failovers_exactly_or_the_broker_stops(
    sentinels: SentinelSet, record: str, password_file: Path, tmp_path: Path
) -> None:
    """Round after round: a study runs, its primary is SIGKILLed mid-study, the sentinels
    promote the replica, the old primary comes back as the new one's replica. Each round ends
    with the study exact, or the broker stopped with the data-loss message: never a study left
    short while the broker goes on. Last, the primary restarts empty before the sentinels call it
    down (no persistence, restarted at once): the replica copies the empty data set, and the
    broker stops, writing nothing more."""
    cluster = Cluster(sentinels, tmp_path, record_url=record)  # type: ignore[arg-type]
    cluster.conn = connect(sentinels.url, password=PASSWORD)
    logs = iter(tmp_path / f"broker-{i}.log" for i in range(ROUNDS + 2))
    broker_log = next(logs)
    broker = cluster.start_broker(log=broker_log)
    # Leases outlive a failover: with a shorter TTL, an attempt whose worker could not renew
    # during it may count as lost and run again (still told once).
    cluster.start_workers(CAP, lease_ttl_s=10.0, log=tmp_path / "workers.log")
    outcomes = []
    try:
        _rounds(cluster, sentinels, broker, broker_log, logs, outcomes)
    except AssertionError as exc:
        tails = [f"{p.name}:\n{p.read_text()[-4000:]}" for p in sorted(tmp_path.glob("*.log"))]
        raise AssertionError(f"{exc}\nrounds: {outcomes}\n" + "\n".join(tails)) from None
    finally:
        cluster.stop_all()


def _rounds(
    cluster: Cluster,
    sentinels: SentinelSet,
    broker: subprocess.Popen[bytes],
    broker_log: Path,
    logs: Iterator[Path],
    outcomes: list[str],
) -> None:
    if True:
        for _round in range(ROUNDS):
            name = _submit_and_wait_calls(cluster)
            began = time.monotonic()
            old = sentinels.kill_primary()
            new = sentinels.wait_failover(old)
            failover_s = time.monotonic() - began
            sentinels.start_server(old, replica_of=new)
            _open_gate(cluster)
            if _finishes_or_stops(cluster, broker, name):
                _check_exact(cluster, name)
                outcomes.append(f"exact ({failover_s:.1f}s failover)")
            else:
                _check_stopped(broker, broker_log)
                outcomes.append(f"stopped: data lost ({failover_s:.1f}s failover)")
                broker_log = next(logs)
                broker = cluster.start_broker(log=broker_log)
            sentinels.wait_whole()
        print(f"\n  {ROUNDS} failovers: {outcomes}")

        sentinels.set_down_after(60_000)
        try:
            name = _submit_and_wait_calls(cluster)
            port = sentinels.kill_primary()
            sentinels.start_server(port)
            _open_gate(cluster)
            assert not _finishes_or_stops(cluster, broker, name)
            _check_stopped(broker, broker_log)
            keys = Keys(cluster.prefix)
            assert cluster.conn.exists(keys.epoch, keys.broker, keys.status) == 0
        finally:
            sentinels.set_down_after(DOWN_AFTER_MS)
            sentinels.wait_whole()


def _submit_and_wait_calls(cluster: Cluster) -> str:
    """Submit a study whose objective holds until the gate opens (`open_gate`); its name, once
    its first CAP calls started: they are running when the primary goes."""
    cluster.record.delete(f"{cluster.key}:open")
    started = len(cluster.started())
    name = cluster.submit("gated", n_trials=N_TRIALS, concurrency=CAP)
    wait_until(lambda: len(cluster.started()) >= started + CAP, timeout_s=60)
    return name


def _open_gate(cluster: Cluster) -> None:
    cluster.record.set(f"{cluster.key}:open", 1)


def _finishes_or_stops(cluster: Cluster, broker: subprocess.Popen[bytes], name: str) -> bool:
    """Wait until study `name` finishes (True) or the broker exits (False)."""
    wait_until(
        lambda: broker.poll() is not None or _finished(cluster, name),
        timeout_s=90,
        message=f"study {name}: neither finished nor the broker stopped",
    )
    return broker.poll() is None


def _check_exact(cluster: Cluster, name: str) -> None:
    """The fault tests' invariants, and each COMPLETE trial's objective ran (its own record, on
    another Redis); a trial failed only as lost, and was run again."""
    trials = cluster.check(name, complete=N_TRIALS, cap=CAP)
    calls = cluster.calls()
    ran = [t for t in trials if t.state is TrialState.COMPLETE]
    assert all(calls.get(repr(t.params["x"]), 0) >= 1 for t in ran), calls
    reasons = {t.user_attrs.get("fail_reason") for t in trials if t.state is TrialState.FAIL}
    assert reasons <= {"worker_lost"}, reasons


def _check_stopped(broker: subprocess.Popen[bytes], log: Path) -> None:
    assert broker.wait(timeout=30) != 0
    text = log.read_text()
    assert "Redis lost its data" in text, text


def _finished(cluster: Cluster, name: str) -> bool:
    try:
        return cluster.status(name).get("state") == "finished"
    except redis.RedisError:  # between two primaries
        return False


def test_a_study_over_tls_through_the_sentinels(
    record: str, password_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """`rediss+sentinel://`: TLS to the sentinels and to the servers, verified against the CA
    the URL names (`ssl_ca_certs`), as a `rediss://` URL is; without it, refused."""
    executable = tls_capable_server()
    if executable is None or shutil.which("openssl") is None:
        pytest.skip("no TLS-capable redis-server on PATH, or no openssl: the TLS test did not run")
    directory = tmp_path_factory.mktemp("tls-sentinels")
    certificates(directory)
    group = SentinelSet(executable, directory, tls=True)
    try:
        group.start()
        ping_or_raise(connect(group.url, password=PASSWORD), group.url)
        cluster = Cluster(group, directory, record_url=record)  # type: ignore[arg-type]
        cluster.conn = connect(group.url, password=PASSWORD)
        try:
            cluster.start_workers(1)
            opt = Optimizer(
                "tests.support.fault_objectives:steady",
                1,
                3,
                redis_url=group.url,
                prefix=cluster.prefix,
            )
            opt.run(x=suggest.float(0, 1), redis_url=record, key=cluster.key, hold_s=0.01)
            assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 3
        finally:
            cluster.stop_all()
        untrusted = group.url.partition("&ssl_ca_certs")[0]
        with pytest.raises(RedisUnavailableError):
            ping_or_raise(connect(untrusted, password=PASSWORD), untrusted)
    finally:
        group.stop()
