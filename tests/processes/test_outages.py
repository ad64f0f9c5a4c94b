"""Redis outages are quiet and unsynchronised: every process retries Redis with one jittered
backoff, says once that Redis went away and once that it is back (`optuna_rq.plumbing.outages`),
and a pool or a broker stopped during an outage stops at once, without a traceback, saying what it
left undone. Real processes on a real redis-server with AOF, killed and restarted on the same socket
(so its data and the broker's epoch survive); the jitter itself in-process.
"""

from __future__ import annotations

import ast
import collections
import re
import signal
import statistics
import threading
import time
from pathlib import Path

import pytest
import redis
from optuna.trial import TrialState

from optuna_rq.plumbing.connection import RETRY_BASE_S, RETRY_CAP_S, connect
from optuna_rq.plumbing.outages import Outage, backoff, describe_duration, outage_of
from optuna_rq.plumbing.redis_waits import wait_for_redis
from optuna_rq.study.verdict import FAIL_REASON_ATTR
from tests.support import source_trees
from tests.support.cluster import Cluster, RedisServer, wait_calls
from tests.support.cluster import aof_redis as aof_redis  # the fixtures
from tests.support.cluster import cluster as cluster
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(240)

OUTAGE_S = 6.0
"""How long Redis stays away once every process has seen it go: several of their retries (the
broker's backoff is capped at 5 s, a worker's dequeue at 5 s, their clients' at 2 s)."""

# A line of the logs the CLI processes write, by the logger and the process that wrote it: a
# pool's parent and the broker log as `name: message`, worker children and the broker's sampling
# process as `name[pid] message`.
_LINE = re.compile(r"^\S+ \S+ (?P<level>[A-Z]+) (?P<name>[\w.]+)(?:\[(?P<pid>\d+)\])?:? ")
_DOWN = re.compile(r"Redis at (\S+) is unreachable \(.*\): retrying with backoff")
_BACK = re.compile(r"Redis at (\S+) is back after \S+ \(\d+ retr(?:y|ies)\)$")


def _lines(log: Path, since: int) -> list[str]:
    return log.read_bytes()[since:].decode(errors="replace").splitlines()


def _by_process(lines: list[str], pattern: re.Pattern[str]) -> collections.Counter[str]:
    """How many lines matching `pattern` each process wrote (its pid, or `main`)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in lines:
        head = _LINE.match(line)
        if head and pattern.search(line):
            counts[head["pid"] or "main"] += 1
    return counts


def _said(log: Path, since: int, pattern: re.Pattern[str]) -> collections.Counter[str]:
    return _by_process(_lines(log, since), pattern)


def test_an_outage_is_one_line_down_and_one_back_per_process_and_the_study_ends_exact(
    cluster: Cluster, aof_redis: RedisServer, tmp_path: Path
) -> None:
    """Redis killed mid-study for several retry periods: each process (the broker, the pool's
    parent, each worker child that met it) writes one line when it goes and one when it is
    back, nothing else while it is away, no traceback, none of RQ's retry lines; the study
    finishes exact."""
    pool_log, broker_log = tmp_path / "pool.log", tmp_path / "broker.log"
    cluster.start_workers(3, log=pool_log)  # 3 for a cap of 2: an idle one waits in RQ's dequeue
    cluster.start_broker(log=broker_log)
    name = cluster.submit("steady", n_trials=10, concurrency=2, hold_s=0.3)
    wait_until(lambda: cluster.status(name).get("complete", 0) >= 3, timeout_s=60)
    pool_at, broker_at = pool_log.stat().st_size, broker_log.stat().st_size

    aof_redis.kill()
    wait_until(
        lambda: _said(pool_log, pool_at, _DOWN)["main"] and _said(broker_log, broker_at, _DOWN),
        timeout_s=30,
        message="the broker and the pool's parent did not see Redis go",
    )
    time.sleep(OUTAGE_S)  # the outage itself: nothing to poll for while Redis is away
    during = {"pool": _lines(pool_log, pool_at), "broker": _lines(broker_log, broker_at)}
    aof_redis.start()

    cluster.check(name, complete=10, cap=2)
    for lines in during.values():
        # Every line written while Redis was away says it went, once per process.
        assert all(_DOWN.search(line) for line in lines), "\n".join(lines)
        down = _by_process(lines, _DOWN)
        assert down and max(down.values()) == 1, down
    for log, since in ((pool_log, pool_at), (broker_log, broker_at)):
        # Each process that said Redis went says it is back, once (a child says so when its
        # dequeue next reaches Redis, the pool's parent at its next heartbeat).
        went = _said(log, since, _DOWN)
        wait_until(lambda: _said(log, since, _BACK) == went, timeout_s=30)  # noqa: B023
        text = log.read_text()
        assert "Traceback" not in text, text[-3000:]
        assert "could not connect to Redis" not in text, text[-3000:]  # RQ's own retry loop
        assert "still unreachable" not in text, text[-3000:]  # a line per retry
    assert _said(pool_log, pool_at, _BACK)["main"] == 1
    assert sum(_said(broker_log, broker_at, _BACK).values()) >= 1
    assert len(_said(pool_log, pool_at, _DOWN)) >= 2, "no worker child met the outage"


@pytest.mark.parametrize("isolation", ["process", "fork"])
def test_a_pool_and_a_broker_stopped_during_an_outage_stop_cleanly_saying_what_they_left(
    cluster: Cluster, aof_redis: RedisServer, tmp_path: Path, isolation: str
) -> None:
    """SIGTERM to the pool and the broker while Redis is away: both exit 0, with no traceback,
    the pool saying which finished trial's result it could not deliver (a forked work horse's
    too: the warm shutdown reaches it) and each what it left to expire. Redis back, a new broker
    and pool finish the study exactly: the undelivered trial is found lost (its lease lapsed)
    and run again."""
    pool_log, broker_log = tmp_path / "pool.log", tmp_path / "broker.log"
    gate = tmp_path / "gate"
    pool = cluster.start_workers(2, isolation, log=pool_log)
    broker = cluster.start_broker(log=broker_log)
    name = cluster.submit("offline", n_trials=3, concurrency=1, extra=("--param", f"gate={gate}"))
    wait_calls(cluster, 1)  # its first trial holds until the gate opens

    aof_redis.kill()
    wait_until(
        lambda: _said(pool_log, 0, _DOWN)["main"] and _said(broker_log, 0, _DOWN),
        timeout_s=30,
        message="the broker and the pool's parent did not see Redis go",
    )
    pool.send_signal(signal.SIGTERM)
    broker.send_signal(signal.SIGTERM)
    wait_until(lambda: "warm shutdown" in pool_log.read_text(), timeout_s=30)
    gate.touch()  # the trial ends while Redis is away, its worker told to stop
    assert pool.wait(timeout=60) == 0, pool_log.read_text()[-3000:]
    assert broker.wait(timeout=60) == 0, broker_log.read_text()[-3000:]

    pool_text, broker_text = pool_log.read_text(), broker_log.read_text()
    assert "Traceback" not in pool_text + broker_text, pool_text[-3000:] + broker_text[-3000:]
    undelivered = [line for line in pool_text.splitlines() if "NOT delivered" in line]
    assert len(undelivered) == 1 and "trial 0 (attempt 1): COMPLETE value=" in undelivered[0], (
        pool_text[-3000:]
    )
    assert "the broker runs the trial again once its lease lapses" in undelivered[0]
    stopping = re.compile(r"stopping while Redis at \S+ is unreachable \(for ")
    assert _said(pool_log, 0, stopping)["main"] == 1, pool_text[-3000:]  # its heartbeat
    assert "the pool's heartbeat is left to expire" in pool_text
    assert sum(_said(broker_log, 0, stopping).values()) == 1, broker_text[-3000:]
    assert "the broker lock left to expire" in broker_text
    assert max(_said(pool_log, 0, _DOWN).values()) == 1, pool_text[-3000:]

    if isolation != "process":
        return  # what follows is the broker's, whatever ran the trial
    aof_redis.start()
    cluster.start_workers(1)
    cluster.start_broker()
    cluster.wait_finished(name)
    trials = cluster.trials(name)
    states = collections.Counter(t.state for t in trials)
    assert states[TrialState.COMPLETE] == 3, [(t.number, t.state, t.user_attrs) for t in trials]
    lost = [t for t in trials if t.state is TrialState.FAIL]
    assert [t.number for t in lost] == [0] and lost[0].user_attrs[FAIL_REASON_ATTR] == (
        "worker_lost"
    ), [(t.number, t.state, t.user_attrs) for t in trials]
    tells = cluster.tells()
    assert all(tells[t._trial_id] == 1 for t in trials), tells


# -- the backoff and the account, in-process ----------------------------------------------------


def test_the_backoff_is_jittered_capped_and_grows() -> None:
    """Two clients that failed together wait different delays; each delay stays within
    min(cap, base * 2**n), and the delays grow with the failures until the cap."""
    base_s, cap_s = 0.1, 2.0
    first, second = backoff(base_s=base_s, cap_s=cap_s), backoff(base_s=base_s, cap_s=cap_s)
    for failures in range(1, 12):
        a = [first.compute(failures) for _ in range(200)]
        b = [second.compute(failures) for _ in range(200)]
        assert a != b, "two backoffs drew the same delays: not jittered"
        bound = min(cap_s, base_s * 2**failures)
        assert all(0 <= d <= bound for d in a + b), (failures, max(a + b), bound)
    means = [statistics.mean(first.compute(n) for _ in range(2000)) for n in range(1, 6)]
    assert means == sorted(means) and means[-1] > 4 * means[0], means  # grows until the cap


def test_connect_retries_with_the_jittered_backoff(tmp_path: Path) -> None:
    """connect()'s client retries with the shared backoff (no un-jittered ExponentialBackoff),
    and names its server, password redacted, as the outage lines show it."""
    client = connect(f"unix://user:s3cret@{tmp_path}/none.sock")
    retry = client.get_retry()
    assert retry is not None
    delays = retry._backoff  # redis-py keeps it there, in every version we support
    assert type(delays) is type(backoff(base_s=RETRY_BASE_S, cap_s=RETRY_CAP_S))
    assert len({delays.compute(3) for _ in range(20)}) > 1, "not jittered"
    assert outage_of(client).where == f"unix://user:***@{tmp_path}/none.sock"
    client.close()


def test_wait_for_redis_says_it_once_counts_the_retries_and_says_it_is_back(
    aof_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """wait_for_redis on a Redis away for several retries: one line when it goes, none per
    retry, one when it is back with the count; a second client of the same server in the same
    process shares the account."""
    caplog.set_level("INFO")
    conn = connect(aof_redis.url, retries=0)
    other = connect(aof_redis.url, retries=0)
    aof_redis.kill()
    try:
        conn.ping()
    except redis.ConnectionError as exc:
        error = exc
    else:
        raise AssertionError("Redis answered after it was killed")
    outage = outage_of(conn)
    assert outage is outage_of(other)
    back = threading.Thread(target=lambda: (_after_retries(outage, 3), aof_redis.start()))
    back.start()
    try:
        waited = wait_for_redis(conn, error, max_backoff_s=0.5)
    finally:
        back.join()
    assert waited is not None and not outage.down
    lines = [r.getMessage() for r in caplog.records if "Redis at" in r.getMessage()]
    assert len(lines) == 2, lines
    assert _DOWN.search(lines[0]) and _BACK.search(lines[1]), lines
    retries = int(re.search(r"\((\d+) retr", lines[1]).group(1))  # type: ignore[union-attr]
    assert retries >= 3, lines
    conn.close()
    other.close()


def _after_retries(outage: Outage, count: int) -> None:
    wait_until(lambda: outage.retries >= count, timeout_s=30)


def test_a_stop_ends_the_wait_and_the_duration_reads_as_a_person_writes_it() -> None:
    stop = threading.Event()
    stop.set()
    conn = redis.Redis(unix_socket_path="/nonexistent/redis.sock")
    assert wait_for_redis(conn, redis.ConnectionError("gone"), stop=stop) is None
    assert outage_of(conn).down
    assert outage_of(conn).recovered() is not None and not outage_of(conn).down
    assert describe_duration(3.4) == "3.4s"
    assert describe_duration(19 * 60 + 2.7) == "19m02s"
    assert describe_duration(2 * 3600 + 5 * 60 + 9) == "2h05m09s"


# -- every site, from the source ------------------------------------------------------------------
# Each `except` of broker/ and workers/ that a Redis outage can reach (it catches redis's
# ConnectionError, TimeoutError or RedisError, and no handler before it in the same `try` took the
# outage), by (file, function, what it catches), with what it does there:
#   "outage":  hands it to the process's Outage (`.failed(`, `wait_for_redis(`, or a helper of
#              its class that calls one of them: `_skipped(`, `_ride_out_outage(`);
#   "raises":  passes it on, to a caller listed here;
#   "quiet: why": neither logs nor sleeps: an answer that stands for "unknown".
# A new handler is a new row, or this test fails: a retry loop that logs per retry, or sleeps
# without the jittered backoff, cannot slip in unlisted.
ROOT = Path(__file__).resolve().parents[2]
OUTAGE_SITES = {
    ("broker/plumbing/redis_waits.py", "wait_for_redis", "UNREACHABLE"): "outage",
    ("broker/plumbing/redis_waits.py", "_wait_for_primary", "UNREACHABLE"): "outage",
    ("broker/plumbing/redis_waits.py", "_memory", "RedisError, KeyError, TypeError, ValueError"): (
        "quiet: INFO not allowed or unreachable: None, the caller's write is the probe"
    ),
    ("broker/plumbing/redis_waits.py", "check_memory_policy", "RedisError"): "quiet: cannot say",
    ("broker/plumbing/connection.py", "ping_or_raise", "RedisError"): (
        "quiet: a start-up probe that gives up within its timeout, raising, naming the URL"
    ),
    ("broker/daemon/backlog.py", "Backlog._execute", "redis.RedisError"): "raises",
    ("broker/daemon/daemon.py", "Daemon.run", "UNREACHABLE"): "outage",
    (
        "broker/daemon/daemon.py",
        "Daemon._survive",
        "redis.ConnectionError, redis.TimeoutError, OutOfMemoryError, ReadOnlyError",
    ): "outage",
    ("broker/daemon/daemon.py", "Daemon.acquire", "redis.RedisError"): (
        "quiet: who held the lock before is unknown, so the journal's grace stands"
    ),
    ("broker/daemon/standby.py", "Standby.wait", "redis.ConnectionError, redis.TimeoutError"): (
        "outage"
    ),
    (
        "broker/daemon/standby.py",
        "Standby._say_not_resumable",
        "redis.ConnectionError, redis.TimeoutError",
    ): "raises",
    ("broker/daemon/standby.py", "Standby._took_over", "redis.RedisError"): (
        "quiet: the takeover time falls back to how long this broker stood by"
    ),
    ("broker/daemon/fence.py", "Fence.refused", "redis.RedisError"): (
        "quiet: the refusal names what it could read"
    ),
    (
        "broker/dispatch/dispatcher.py",
        "Dispatcher.run_until_done",
        "redis.ConnectionError, redis.TimeoutError, OutOfMemoryError",
    ): "outage",
    (
        "broker/optimizer_run/run_status.py",
        "DrivenStatus._publish",
        "redis.ConnectionError, redis.TimeoutError",
    ): ("raises"),
    (
        "broker/plumbing/embedded.py",
        "EmbeddedRedis.answers",
        "RedisError",
    ): "quiet: it does not answer",
    (
        "broker/plumbing/embedded.py",
        "EmbeddedRedis._running_pid",
        "RedisError, KeyError, ValueError",
    ): ("quiet: no pid to tell"),
    ("broker/plumbing/embedded.py", "EmbeddedRedis._shutdown", "RedisError"): "quiet: it went down",
    ("broker/sampling/sampler_main.py", "_answer", "UNREACHABLE"): "outage",
    ("workers/runner.py", "_take_lease", "UNREACHABLE"): "outage",
    ("workers/bookkeeping.py", "RidingQueue.dequeue_any", "UNREACHABLE"): "outage",
    ("workers/bookkeeping.py", "LeanBookkeeping.heartbeat", "UNREACHABLE"): "outage",
    ("workers/bookkeeping.py", "LeanBookkeeping.set_state", "UNREACHABLE"): "outage",
    ("workers/bookkeeping.py", "LeanBookkeeping.job_done", "UNREACHABLE"): "outage",
    ("workers/bookkeeping.py", "LeanBookkeeping.run_maintenance_tasks", "UNREACHABLE"): "outage",
    ("workers/bookkeeping.py", "LeanBookkeeping.register_death", "UNREACHABLE"): "outage",
    (
        "workers/bookkeeping.py",
        "LeanBookkeeping.set_shutdown_requested_date",
        "UNREACHABLE",
    ): "outage",
    ("workers/bookkeeping.py", "LeanBookkeeping._when_room", "UNREACHABLE"): "outage",
    ("workers/worker_process.py", "child_main", "UNREACHABLE"): "outage",
    ("workers/worker_process.py", "_wait_for_redis", "UNREACHABLE"): "outage",
    ("workers/delivery.py", "keep_lease", "redis.RedisError"): (
        "quiet: False, and `deliver` meets the outage itself"
    ),
    ("workers/delivery.py", "deliver", "UNREACHABLE"): "outage",
    ("workers/pool_heartbeat.py", "Heartbeat.beat", "UNREACHABLE"): "outage",
    ("workers/pool_heartbeat.py", "Heartbeat.stop", "UNREACHABLE"): "outage",
    ("workers/pool.py", "WorkerPool._scale", "UNREACHABLE"): "outage",
    ("workers/pool_children.py", "forget_rq_worker", "UNREACHABLE"): "outage",
    ("workers/supervision.py", "LeaseThread._run", "UNREACHABLE"): "outage",
    ("workers/supervision.py", "Supervisor._renew", "UNREACHABLE"): "outage",
}
# Every time.sleep (or asyncio.sleep) of broker/ and workers/, and why it is not a retry of Redis
# that wants the jittered backoff (`redis_waits._pause` with `outages.backoff` is that).
SLEEPS = {
    ("broker/plumbing/connection.py", "ping_or_raise"): "a start-up probe, 2 s in all by default",
    ("broker/plumbing/embedded.py", "EmbeddedRedis._locked"): "a file lock between local processes",
    (
        "broker/plumbing/embedded.py",
        "_wait_for",
    ): "polls a server it starts or stops, up to a timeout",
    ("broker/plumbing/failpoints.py", "hit"): "the fault tests' stall",
    ("broker/examples/rosenbrock.py", "objective"): "the bundled objective's stand-in for work",
    ("broker/cli/study_commands.py", "delete"): "a front door's poll of the broker's answer",
    ("broker/cli/study_commands.py", "enqueue"): "a front door's poll of the broker's receipts",
    ("broker/terminal/progress.py", "follow_study"): "`wait`'s poll of a study's status",
    (
        "broker/storage/journal_lock.py",
        "JournalLock.acquire",
    ): "a journal file's lock, held for a turn",
    ("broker/optimizer.py", "Optimizer.spawn"): "flytekitplugins.optuna's `delay` option",
}
_REDIS_ERRORS = {"ConnectionError", "TimeoutError", "RedisError", "UNREACHABLE"}
_REDIS_ERRORS |= {"RedisConnectionError", "RedisTimeoutError"}
_OUTAGE_CALLS = (".failed(", "wait_for_redis(", "_skipped(", "_ride_out_outage(")
_LOGGER_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


def _sources() -> list[tuple[str, ast.Module]]:
    paths = sorted([*ROOT.glob("broker/**/*.py"), *ROOT.glob("workers/**/*.py")])
    return [(str(p.relative_to(ROOT)), source_trees.parse(p.read_text())) for p in paths]


class _Handlers(ast.NodeVisitor):
    """The `except` handlers an outage reaches, and the sleeps, by enclosing function."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.scope: list[str] = []
        self.handlers: list[tuple[tuple[str, str, str], ast.ExceptHandler]] = []
        self.sleeps: list[tuple[str, str]] = []

    def _scoped(self, node: ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        self.scope.append(node.name)
        self.generic_visit(node)
        self.scope.pop()

    visit_ClassDef = visit_FunctionDef = visit_AsyncFunctionDef = _scoped

    def visit_Try(self, node: ast.Try) -> None:
        taken = False  # an earlier handler of this `try` took the outage
        for handler in node.handlers:
            caught = _caught(handler.type)
            if not taken and {name.rpartition(".")[2] for name in caught} & _REDIS_ERRORS:
                key = (self.path, ".".join(self.scope), ", ".join(caught))
                self.handlers.append((key, handler))
            plain = {name.rpartition(".")[2] for name in caught}
            taken = taken or "UNREACHABLE" in caught or {"ConnectionError", "TimeoutError"} <= plain
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        if ast.unparse(node.func) in ("time.sleep", "asyncio.sleep"):
            self.sleeps.append((self.path, ".".join(self.scope)))
        self.generic_visit(node)


def _caught(node: ast.expr | None) -> list[str]:
    if node is None:
        return ["BaseException"]
    if isinstance(node, ast.Tuple):
        return [ast.unparse(element) for element in node.elts]
    return [ast.unparse(node)]


def _walk() -> tuple[dict[tuple[str, str, str], list[ast.ExceptHandler]], set[tuple[str, str]]]:
    handlers: dict[tuple[str, str, str], list[ast.ExceptHandler]] = collections.defaultdict(list)
    sleeps: set[tuple[str, str]] = set()
    for path, tree in _sources():
        visitor = _Handlers(path)
        visitor.visit(tree)
        for key, handler in visitor.handlers:
            handlers[key].append(handler)
        sleeps |= set(visitor.sleeps)
    return handlers, sleeps


def _logs_or_sleeps(handler: ast.ExceptHandler) -> list[str]:
    found = []
    for node in ast.walk(handler):
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func in ("time.sleep", "asyncio.sleep") or (
                func.rpartition(".")[2] in _LOGGER_METHODS and func.count(".") >= 1
            ):
                found.append(func)
    return found


def test_every_place_a_redis_outage_reaches_is_listed_and_goes_through_the_outage() -> None:
    handlers, _ = _walk()
    assert set(handlers) == set(OUTAGE_SITES), (
        f"unlisted: {sorted(set(handlers) - set(OUTAGE_SITES))}; "
        f"gone: {sorted(set(OUTAGE_SITES) - set(handlers))}"
    )
    for key, found in handlers.items():
        kind = OUTAGE_SITES[key]
        for handler in found:
            body = ast.unparse(handler)
            said = _logs_or_sleeps(handler)
            if kind == "outage":
                assert any(call in body for call in _OUTAGE_CALLS), (key, body)
                assert not said, (key, "logs or sleeps itself, not through the Outage", said)
            elif kind == "raises":
                assert any(isinstance(node, ast.Raise) for node in ast.walk(handler)), key
            else:
                assert kind.startswith("quiet: "), (key, kind)
                assert not said, (key, said)


def test_every_sleep_is_listed_and_no_retry_waits_without_jitter() -> None:
    _, sleeps = _walk()
    assert sleeps == set(SLEEPS), (
        f"unlisted: {sorted(sleeps - set(SLEEPS))}; gone: {sorted(set(SLEEPS) - sleeps)}"
    )
    for path, tree in _sources():
        source = ast.unparse(tree)
        for banned in ("ExponentialBackoff(", "ConstantBackoff("):  # fixed delays: lockstep
            assert banned not in source, (path, banned)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("Retry", "redis.Retry"):
                given = ast.unparse(node.args[0])
                assert given.startswith(("backoff(", "NoBackoff(")), (path, given)
            if isinstance(node, ast.FunctionDef):
                text = ast.unparse(node)
                if "_pause(" in text and node.name != "_pause":  # a wait loop between tries
                    assert ".compute(" in text, (path, node.name, "waits without the backoff")


def test_rqs_own_retry_loop_is_never_reached(redis_url: str) -> None:
    """RQ's dequeue loop logs an ERROR per retry and sleeps without jitter: both worker classes
    dequeue through `RidingQueue`, which rides the outage out before RQ's handler sees it."""
    from optuna_rq.workers.bookkeeping import RidingQueue
    from optuna_rq.workers.rq_worker import ISOLATION, new_worker

    conn = connect(redis_url)
    for isolation in ISOLATION:
        worker = new_worker(isolation, conn, ["q"], name=f"w-{isolation}")
        assert worker.queue_class is RidingQueue, isolation
    conn.close()
