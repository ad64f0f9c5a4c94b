"""A Redis behind Sentinel (`redis+sentinel://`), against real servers: a primary, a replica and
three sentinels, all with a password. Every role reaches it through the URL alone, and a study
rides out the primary's SIGKILL, failover after failover: it ends exact (every trial told once,
each COMPLETE trial's objective really ran), or the broker stops with the data-loss message.

The sentinels run the suite's server binary in sentinel mode (`redis-server sentinel.conf
--sentinel`), else Debian's `redis-sentinel`; without either, the tests skip saying so.
"""

from __future__ import annotations

import collections
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
from optuna_rq.connection import connect, ping_or_raise, redact_url
from optuna_rq.errors import ConfigError, RedisUnavailableError
from optuna_rq.sampling import SAMPLES_TO_DECIDE
from tests.conftest import redis_server
from tests.faults.conftest import Cluster
from tests.helpers import wait_until
from tests.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(150)

SERVICE = "orq"
PASSWORD = "p@ss/w:rd#1"
"""Every character here would break, or be cut at, in a URL unescaped: it is given apart."""
DOWN_AFTER_MS = 1000
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

    def __init__(self, executable: str, directory: Path) -> None:
        self.executable = executable
        self.directory = directory
        self.servers: dict[int, subprocess.Popen[bytes]] = {}
        self.sentinels: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinels)
        return f"redis+sentinel://{hosts}/{SERVICE}?sentinel_auth=same"

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
        self.wait_replicated(replica)

    def start_server(self, port: int, *, replica_of: int | None = None) -> None:
        data = self.directory / str(port)
        data.mkdir(exist_ok=True)
        argv = [self.executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
        argv += ["--save", "", "--appendonly", "no", "--logfile", str(data / "redis.log")]
        argv += ["--requirepass", PASSWORD, "--masterauth", PASSWORD]
        if replica_of is not None:
            argv += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.servers[port] = subprocess.Popen(argv, stdin=subprocess.DEVNULL)
        client = self._client(port)
        wait_until(lambda: _answers(client), timeout_s=15, message=f"server {port} did not start")

    def start_sentinel(self, port: int, primary: int) -> None:
        conf = self.directory / f"sentinel-{port}.conf"
        quoted = '"' + PASSWORD + '"'
        conf.write_text(
            f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
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
        pytest.skip(
            f"no Redis Sentinel here ({self.executable} does not run one, and there is no "
            f"redis-sentinel): {INSTALL}"
        )

    def _client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, socket_timeout=2)

    def _sentinel_client(self, port: int) -> redis.Redis:
        return redis.Redis(port=port, password=PASSWORD, socket_timeout=2, decode_responses=True)

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

    def wait_replicated(self, port: int) -> None:
        """Wait until the replica at `port` is in sync with the primary, and every sentinel
        counts it as a replica it could promote."""
        client = self._client(port)

        def synced() -> bool:
            try:
                info = client.info("replication")
            except redis.RedisError:
                return False
            return info.get("master_link_status") == "up" and not info["master_sync_in_progress"]

        wait_until(synced, timeout_s=30, message=f"replica {port} did not sync")

        def promotable() -> bool:
            for sentinel in self.sentinels:
                replicas = self._sentinel_client(sentinel).sentinel_slaves(SERVICE)
                mine = [r for r in replicas if int(r["port"]) == port]
                if not mine or mine[0]["is_sdown"] or mine[0]["is_odown"]:
                    return False
            return True

        wait_until(promotable, timeout_s=30, message=f"the sentinels do not see replica {port}")

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


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    executable = redis_server()
    if executable is None:
        pytest.skip(f"no redis-server here: apt-get install -y redis-server ({INSTALL})")
    directory = Path(tempfile.mkdtemp(prefix="orqs", dir="/tmp"))
    group = SentinelSet(executable, directory)
    try:
        group.start()
        yield group
    finally:
        group.stop()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def record(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
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
            "tests.fault_objectives:steady", 2, 4, redis_url=sentinels.url, prefix=cluster.prefix
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
    # A service the sentinels do not watch.
    with pytest.raises(RedisUnavailableError, match="No master found for 'nope'"):
        url = f"redis+sentinel://{hosts}/nope?sentinel_auth=same"
        ping_or_raise(connect(url, password=PASSWORD), url)
    assert "***" in redact_url(f"redis+sentinel://u:{PASSWORD}@{hosts}/s?sentinel_password=x")


ROUNDS = 3
N_TRIALS = 12
CAP = 3


def test_a_study_rides_out_failovers_exactly_or_the_broker_stops(
    sentinels: SentinelSet, record: str, password_file: Path, tmp_path: Path
) -> None:
    """Round after round: a study runs, its primary is SIGKILLed mid-study, the sentinels
    promote the replica, the old primary comes back as the new one's replica. Each round ends
    with the study exact, or the broker stopped with the data-loss message: never both, never
    a study left short while the broker goes on."""
    cluster = Cluster(sentinels, tmp_path, record_url=record)  # type: ignore[arg-type]
    cluster.conn = connect(sentinels.url, password=PASSWORD)
    logs = iter(tmp_path / f"broker-{i}.log" for i in range(ROUNDS + 1))
    broker_log = next(logs)
    broker = cluster.start_broker(log=broker_log)
    cluster.start_workers(CAP, lease_ttl_s=10.0)
    outcomes = []
    try:
        for _round in range(ROUNDS):
            started = len(cluster.started())
            name = cluster.submit("steady", n_trials=N_TRIALS, concurrency=CAP, hold_s=0.3)
            wait_until(lambda n=started: len(cluster.started()) >= n + CAP, timeout_s=60)
            began = time.monotonic()
            old = sentinels.kill_primary()
            new = sentinels.wait_failover(old)
            failover_s = time.monotonic() - began
            sentinels.start_server(old, replica_of=new)
            wait_until(
                lambda b=broker, n=name: b.poll() is not None or _finished(cluster, n),
                timeout_s=90,
                message=f"study {name}: neither finished nor stopped",
            )
            if broker.poll() is None:
                trials = cluster.check(name, complete=N_TRIALS, cap=CAP)
                calls = cluster.calls()
                ran = [t for t in trials if t.state is TrialState.COMPLETE]
                assert all(calls.get(repr(t.params["x"]), 0) >= 1 for t in ran), calls
                reasons = collections.Counter(
                    t.user_attrs.get("fail_reason") for t in trials if t.state is TrialState.FAIL
                )
                assert set(reasons) <= {"worker_lost"}, reasons
                outcomes.append(f"exact ({failover_s:.1f}s failover, {dict(reasons)} retried)")
            else:
                assert broker.returncode != 0
                assert "Redis lost its data" in broker_log.read_text()
                outcomes.append(f"stopped: data lost ({failover_s:.1f}s failover)")
                broker_log = next(logs)
                broker = cluster.start_broker(log=broker_log)
            sentinels.wait_replicated(old)
        print(f"\n  {ROUNDS} failovers: {outcomes}")
    finally:
        cluster.stop_all()


def _finished(cluster: Cluster, name: str) -> bool:
    try:
        return cluster.status(name).get("state") == "finished"
    except redis.RedisError:  # between two primaries
        return False
