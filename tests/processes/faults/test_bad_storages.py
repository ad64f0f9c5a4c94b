"""A study whose storage cannot be opened, does not answer, or fails mid-study ends FAILED with
the cause in its status; the broker (the same process) serves every other study on, and a broker
restarted with the bad study's spec stored comes up and serves."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from optuna_rq.client import BrokerClient
from optuna_rq.plumbing.embedded import server_executable
from optuna_rq.protocol import Signer, StudySpec
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli

pytestmark = pytest.mark.timeout(240)


def _failed(cluster: Cluster, name: str) -> dict[str, object]:
    wait_until(
        lambda: cluster.status(name).get("state") == "failed",
        timeout_s=60,
        message=f"study {name} did not fail: {cluster.status(name)}",
    )
    return cluster.status(name)


@pytest.mark.parametrize(
    ("storage", "cause"),
    [
        ("journal:///dev/null/studies.journal", "FileExistsError"),
        ("redis://127.0.0.1:1/0", "ConnectionError"),
    ],
    ids=["path-cannot-be-created", "server-down"],
)
def test_a_storage_that_cannot_be_opened_fails_its_study_alone(
    cluster: Cluster, tmp_path: Path, storage: str, cause: str
) -> None:
    # Given a broker serving a study
    cluster.start_workers(2)
    log = tmp_path / "broker.log"
    allowed = ("--allow-storage", storage)  # its operator allows it: it fails when opened
    broker = cluster.start_broker(log=log, args=allowed)
    good = cluster.submit("steady", n_trials=8, concurrency=2, hold_s=0.3)

    # When a study whose storage cannot be opened is submitted, past the CLI's own check of the
    # URL (a script on BrokerClient, an older CLI, a forged command: the broker decides alone)
    bad = _submit_on_the_wire(cluster, storage)

    # Then it alone fails, with the cause, and the same broker finishes the other
    status = _failed(cluster, bad)
    assert cause in str(status["error"]), status
    cluster.check(good, complete=8, cap=2, failed=0)
    assert broker.poll() is None
    assert str(broker.pid) in cluster.conn.get(f"{cluster.prefix}:broker").decode()
    # Its own Redis was never taken for unreachable
    assert "unreachable" not in log.read_text()

    # And a broker restarted with the bad spec stored (even with no status saying it failed,
    # as a broker that died on it left it) comes up and serves
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=30) == 0
    cluster.conn.hdel(f"{cluster.prefix}:status", bad)
    restarted = cluster.start_broker(args=allowed)
    assert cause in str(_failed(cluster, bad)["error"])
    after = cluster.submit("steady", n_trials=3, concurrency=2, hold_s=0.1)
    cluster.wait_finished(after)
    assert restarted.poll() is None


def _submit_on_the_wire(cluster: Cluster, storage: str) -> str:
    name = f"bad-{uuid.uuid4().hex[:6]}"
    spec = StudySpec(
        name=name,
        objective="tests.support.fault_objectives:steady",
        space={
            "x": {"type": "float", "low": 0, "high": 1},
            "redis_url": cluster.server.url,
            "key": cluster.key,
        },
        n_trials=4,
        concurrency=2,
        storage=storage,
    )
    BrokerClient(cluster.conn, cluster.prefix, signer=Signer()).submit(spec)
    return name


def test_the_cli_refuses_a_storage_path_that_cannot_be_created(cluster: Cluster) -> None:
    done = subprocess.run(
        cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix, "submit")
        + ["tests.support.fault_objectives:steady", "--n-trials", "1", "--concurrency", "1"]
        + ["--storage", "journal:///dev/null/studies.journal"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "cannot create '/dev/null'" in done.stderr, done.stderr
    assert cluster.conn.llen(f"{cluster.prefix}:commands") == 0


class TcpRedis:
    """A redis-server on a TCP port, without persistence: a study's storage, to be killed."""

    def __init__(self) -> None:
        exe = server_executable()  # the embedded server's binary, or one on PATH
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.directory = Path(tempfile.mkdtemp(prefix="orqs", dir="/tmp"))
        self.process = subprocess.Popen(
            [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port, socket_timeout=1)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        wait_until(answers, timeout_s=15, message="the storage's redis-server did not start")
        client.close()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture
def storage_redis() -> Iterator[TcpRedis]:
    server = TcpRedis()
    yield server
    server.stop()


def test_a_storage_that_fails_mid_study_fails_its_study_alone(
    cluster: Cluster, storage_redis: TcpRedis, tmp_path: Path
) -> None:
    # Given two studies running side by side, one of them stored in a Redis of its own
    cluster.start_workers(3)
    log = tmp_path / "broker.log"
    broker = cluster.start_broker(log=log, args=("--allow-storage", storage_redis.url))
    doomed = cluster.submit(
        "steady", n_trials=200, concurrency=1, hold_s=0.2, extra=("--storage", storage_redis.url)
    )
    good = cluster.submit("steady", n_trials=30, concurrency=2, hold_s=0.2)
    wait_until(lambda: cluster.status(doomed).get("complete", 0) >= 2, timeout_s=60)

    # When that Redis dies mid-study
    storage_redis.stop()

    # Then that study fails with the cause, and the same broker finishes the other
    status = _failed(cluster, doomed)
    assert "ConnectionError" in str(status["error"]), status
    cluster.check(good, complete=30, cap=3, failed=0)
    assert broker.poll() is None
    assert str(broker.pid) in cluster.conn.get(f"{cluster.prefix}:broker").decode()
    assert "unreachable" not in log.read_text()
