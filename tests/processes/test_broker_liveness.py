"""A dead broker shows: `status`, `wait` and `submit --wait` know whether a broker serves the
prefix (its lock, and its loop's last turn: `protocol/liveness.py`).

The class: every combination of the lock and the turn record, judged in-process against the real
Redis; then, with real processes and real signals, a SIGKILLed broker (`wait` and `submit --wait`
exit 3, `status` says it), a broker frozen briefly (nothing trips) and `--wait-for-broker`
through a restart (finishes 0).
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from optuna_rq.cli.app import main
from optuna_rq.client import BrokerClient
from optuna_rq.daemon.lock import BrokerLock
from optuna_rq.errors import FenceLostError
from optuna_rq.protocol import Keys, StudyState, StudyStatus, liveness
from optuna_rq.protocol.liveness import BROKER_GRACE_S, BrokerState, TurnBeacon
from optuna_rq.terminal.follow_watches import BrokerWatch
from optuna_rq.terminal.progress import EXIT_NO_BROKER
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, start_broker, stop_process

pytestmark = pytest.mark.timeout(180)

X = "x={type: float, low: -10, high: 10}"
OLD = "oldhost:4242 since 2026-01-01T00:00:00+00:00"
NEW = "newhost:99 since 2026-01-01T00:01:00+00:00"


def plant(conn: redis.Redis, prefix: str, *, holder: str | None, turn: tuple[str, float] | None):
    """Set the prefix's lock to `holder` and its turn record to (broker, seconds ago), by the
    server's clock, as a broker would have left them."""
    keys = Keys(prefix)
    conn.delete(keys.broker, keys.broker_turn)
    if holder is not None:
        conn.set(keys.broker, holder, px=60_000)
    if turn is not None:
        broker, age_s = turn
        now_s, now_us = conn.time()
        at_us = now_s * 1_000_000 + now_us - int(age_s * 1_000_000)
        conn.hset(
            keys.broker_turn,
            mapping={"broker": broker, "at_s": at_us // 1_000_000, "at_us": at_us % 1_000_000},
        )


def steady(text: str | None) -> str:
    """`text` with its ages (`stopped 41s ago`: seconds pass while a test runs) as `Ns`."""
    return re.sub(r"stopped \d+[smhd] ago", "stopped Ns ago", text or "")


GRACE = 600.0
"""The grace the judging tests use: ages far inside and outside it, so that no stall of a loaded
machine between planting the keys and reading them changes an outcome."""
WITHIN, PAST = 300.0, 3600.0

# (lock holder, turn record (broker, age s), state, a follower gives up)
CASES = [
    pytest.param(None, None, BrokerState.NONE, True, id="no broker ever ran"),
    pytest.param(OLD, None, BrokerState.STARTING, False, id="first broker, before its turn"),
    pytest.param(OLD, (OLD, 0.0), BrokerState.SERVING, False, id="serving"),
    pytest.param(OLD, (OLD, WITHIN), BrokerState.SERVING, False, id="frozen within the grace"),
    pytest.param(OLD, (OLD, PAST), BrokerState.STOPPED, True, id="killed, lock not expired"),
    pytest.param(NEW, (OLD, PAST), BrokerState.STARTING, False, id="restarted: took the lock"),
    pytest.param(None, (OLD, WITHIN), BrokerState.STOPPED, False, id="stopped within the grace"),
    pytest.param(None, (OLD, PAST), BrokerState.STOPPED, True, id="stopped, lock gone"),
]


@pytest.mark.parametrize(("holder", "turn", "state", "gives_up"), CASES)
def test_the_lock_and_the_turn_record_judge_the_broker(
    conn: redis.Redis,
    prefix: str,
    holder: str | None,
    turn: tuple[str, float] | None,
    state: BrokerState,
    gives_up: bool,
) -> None:
    plant(conn, prefix, holder=holder, turn=turn)
    client = BrokerClient(conn, prefix)
    live = client.liveness(grace_s=GRACE)
    assert live.state is state, live
    assert live.holder == holder
    # A follower that has waited for a broker to start for an hour gives up if none serves past
    # the grace; one that just started gives a broker time to start (one starting now, while its
    # predecessor's last turn is long past).
    waited = BrokerWatch(client, grace_s=GRACE, since=time.monotonic() - 2 * PAST)
    assert (waited.gone() is not None) == gives_up
    assert BrokerWatch(client, grace_s=GRACE).gone() is None
    if state is BrokerState.NONE:
        assert live.note() == (
            f"no broker is running on prefix {prefix!r}: start one with `optuna-rq broker`"
        )
    elif state is BrokerState.STOPPED:
        assert steady(live.note()) == "no broker: the broker on oldhost:4242 stopped Ns ago"
        assert live.last_turn_age_s is not None and live.last_turn_age_s >= turn[1]  # type: ignore[index]
    else:
        assert live.note() is None and live.serves


def test_a_follower_that_saw_the_broker_serve_gives_up_once_it_stops_past_the_grace(
    conn: redis.Redis, prefix: str
) -> None:
    watch = BrokerWatch(BrokerClient(conn, prefix), grace_s=GRACE)  # no start grace spent
    plant(conn, prefix, holder=OLD, turn=(OLD, 0.0))
    assert watch.gone() is None and watch.seen_serving
    for holder, age_s in ((OLD, WITHIN), (None, WITHIN), (NEW, PAST)):  # frozen, restarting
        plant(conn, prefix, holder=holder, turn=(OLD, age_s))
        assert watch.gone() is None, (holder, age_s)
    for holder, age_s in ((OLD, PAST), (None, PAST)):  # killed, stopped: gone
        plant(conn, prefix, holder=holder, turn=(OLD, age_s))
        gone = watch.gone()
        assert gone is not None and gone.state is BrokerState.STOPPED, (holder, age_s)


def test_only_the_lock_holder_writes_the_turn_record(conn: redis.Redis, prefix: str) -> None:
    """The beacon writes through the broker's fenced client: once another broker holds the lock
    (or none does, and another took it in between), a stale broker writes nothing."""
    keys = Keys(prefix)
    lock = BrokerLock(conn, keys, ttl_s=60)
    lock.acquire()
    beacon = TurnBeacon(lock.connection, keys, identity=lock.identity)
    beacon.beat()
    assert conn.hget(keys.broker_turn, "broker") == lock.identity.encode()
    live = BrokerClient(conn, prefix).liveness()
    assert live.state is BrokerState.SERVING and live.last_turn_age_s is not None
    conn.delete(keys.broker_turn)
    conn.set(keys.broker, NEW, px=60_000)  # another broker took over
    with pytest.raises(FenceLostError):
        TurnBeacon(lock.connection, keys, identity=lock.identity).beat()
    assert not conn.exists(keys.broker_turn)


def running_status(name: str, state: StudyState = StudyState.RUNNING) -> StudyStatus:
    return StudyStatus(
        name=name,
        state=state,
        objective="tests.support.objectives:quadratic",
        directions=["minimize"],
        n_trials=10,
        concurrency=1,
        priority=1.0,
        storage="memory",
    )


def run_main(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """`optuna-rq ARGS...` in this process: (exit code, stdout, stderr)."""
    with pytest.raises(SystemExit) as exited:
        main(list(args))
    out = capsys.readouterr()
    return int(exited.value.code or 0), out.out, out.err


def test_status_says_when_no_broker_serves_a_study(
    conn: redis.Redis, prefix: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys(prefix)
    conn.hset(keys.status, "busy", running_status("busy").to_json())
    conn.hset(keys.status, "done", running_status("done", StudyState.FINISHED).to_json())
    status = ("--redis-url", redis_url, "--prefix", prefix, "status")

    plant(conn, prefix, holder=None, turn=(OLD, 40.0))
    code, detail, _ = run_main(capsys, *status, "busy")
    assert code == 0
    assert "state        running (no broker: the broker on oldhost:4242 stopped Ns ago)" in (
        steady(detail).splitlines()
    ), detail
    code, table, err = run_main(capsys, *status)
    rows = {line.split("  ")[0]: line for line in table.splitlines()[1:]}
    assert "running (no broker)" in rows["busy"] and "no broker" not in rows["done"], table
    assert steady(err.strip()) == "no broker: the broker on oldhost:4242 stopped Ns ago"
    code, raw, _ = run_main(capsys, *status, "busy", "--json")
    broker = json.loads(raw)["broker"]
    assert broker["state"] == "stopped" and broker["holder"] is None
    assert broker["last_broker"] == OLD and broker["last_turn_age_s"] >= 40
    assert StudyStatus.from_json(raw).name == "busy"  # a script's decode ignores it
    listed = json.loads(run_main(capsys, *status, "--json")[1])
    # An ended study's snapshot stays as it was, whatever the broker does: no `broker` there.
    assert {s["name"]: s.get("broker", {}).get("state") for s in listed} == {
        "busy": "stopped",
        "done": None,
    }

    plant(conn, prefix, holder=None, turn=None)
    conn.hset(keys.status, "busy", running_status("busy", StudyState.QUEUED).to_json())
    detail = run_main(capsys, *status, "busy")[1]
    assert (
        f"state        queued (no broker is running on prefix {prefix!r}: start one with "
        "`optuna-rq broker`)"
    ) in detail.splitlines(), detail
    assert json.loads(run_main(capsys, *status, "busy", "--json")[1])["broker"]["state"] == "none"

    plant(conn, prefix, holder=OLD, turn=(OLD, 0.0))
    detail = run_main(capsys, *status, "busy")[1]
    assert "state        queued" in detail.splitlines() and "no broker" not in detail, detail
    code, table, err = run_main(capsys, *status)
    assert "no broker" not in table + err


def test_submit_wait_on_a_prefix_no_broker_ever_ran_on_exits_3(
    conn: redis.Redis,
    prefix: str,
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(liveness, "BROKER_START_GRACE_S", 0.5)  # the message, not the wait
    code, out, err = run_main(
        capsys,
        "--redis-url", redis_url, "--prefix", prefix,
        "submit", "tests.support.objectives:quadratic", "--param", X, "--n-trials", "2",
        "--concurrency", "1", "--study-name", "s", "--wait",
    )  # fmt: skip
    assert code == EXIT_NO_BROKER == 3, err
    assert out.strip() == "s"
    assert (
        f"no broker is running on prefix {prefix!r}: start one with `optuna-rq broker` "
        "(study 's' is queued; --wait-for-broker waits for one)"
    ) in err, err
    assert BrokerClient(conn, prefix).require_status("s").state is StudyState.QUEUED  # kept


Runner = Callable[..., subprocess.CompletedProcess[str]]


def follower(redis_url: str, prefix: str, state: Path, log: Path, *args: str):
    """`optuna-rq ARGS...` started in the background, its stderr to `log`."""
    with open(log, "wb") as err:
        return subprocess.Popen(
            cli("--redis-url", redis_url, "--prefix", prefix, *args),
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(state)),
            stdout=subprocess.DEVNULL,
            stderr=err,
        )


def submit_args(name: str, *extra: str) -> tuple[str, ...]:
    return (
        "submit", "tests.support.objectives:quadratic", "--param", X, "--n-trials", "3",
        "--concurrency", "1", "--study-name", name, *extra,
    )  # fmt: skip


def running(client: BrokerClient, name: str) -> bool:
    status = client.status(name)
    return status is not None and status.state is StudyState.RUNNING


def test_wait_and_submit_wait_exit_3_when_the_broker_is_killed_and_status_says_so(
    run_cli: Runner,
    conn: redis.Redis,
    prefix: str,
    redis_url: str,
    cli_state: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    broker = start_broker(redis_url, prefix, cli_state)
    client = BrokerClient(conn, prefix)
    try:
        # No worker serves these studies: they stay running, their trials queued.
        assert run_cli(*submit_args("waited")).returncode == 0
        wait_until(
            lambda: client.require_status("waited").state is StudyState.RUNNING, timeout_s=60
        )
        wait_until(lambda: client.liveness().state is BrokerState.SERVING, timeout_s=30)
        waiting = follower(redis_url, prefix, cli_state, tmp_path / "wait.log", "wait", "waited")
        submitting = follower(
            redis_url,
            prefix,
            cli_state,
            tmp_path / "submit.log",
            *submit_args("submitted", "--wait"),
        )
        wait_until(lambda: running(client, "submitted"), timeout_s=60)
        assert waiting.poll() is None and submitting.poll() is None  # a serving broker: they wait
        broker.send_signal(signal.SIGKILL)
        broker.wait()
        where = f"{socket.gethostname()}:{broker.pid}"
        followers = ((waiting, "wait.log", "waited"), (submitting, "submit.log", "submitted"))
        for process, log, name in followers:
            assert process.wait(timeout=60) == EXIT_NO_BROKER
            err = (tmp_path / log).read_text()
            assert f"no broker: the broker on {where} stopped " in err, err
            assert (
                f"study {name!r} is still running, and nothing moves it until a broker runs on "
                f"prefix {prefix!r}: start one with `optuna-rq broker` (--wait-for-broker waits "
                "for one)"
            ) in err, err
    finally:
        if broker.poll() is None:
            broker.kill()
            broker.wait()

    detail = run_cli("status", "waited")
    assert f"state        running (no broker: the broker on {where} stopped " in detail.stdout
    table = run_cli("status")
    assert all("running (no broker)" in line for line in table.stdout.splitlines()[1:]), table
    assert table.stderr.startswith(f"no broker: the broker on {where} stopped "), table.stderr
    broker_field = json.loads(run_cli("status", "waited", "--json").stdout)["broker"]
    assert broker_field["state"] == "stopped", broker_field
    assert broker_field["last_broker"].startswith(f"{where} since ")
    assert broker_field["last_turn_age_s"] >= BROKER_GRACE_S


def test_a_broker_frozen_briefly_trips_nothing(
    run_cli: Runner,
    workers_factory,
    conn: redis.Redis,
    prefix: str,
    redis_url: str,
    cli_state: Path,
    tmp_path: Path,
) -> None:
    broker = start_broker(redis_url, prefix, cli_state)
    client = BrokerClient(conn, prefix)
    try:
        assert run_cli(*submit_args("s")).returncode == 0  # no worker yet: it stays running
        wait_until(lambda: running(client, "s"), timeout_s=60)
        wait_until(lambda: client.liveness().state is BrokerState.SERVING, timeout_s=30)
        waiting = follower(redis_url, prefix, cli_state, tmp_path / "wait.log", "wait", "s")
        for _ in range(3):  # each freeze long enough to be seen, shorter than the grace
            broker.send_signal(signal.SIGSTOP)
            try:
                wait_until(lambda: (client.liveness().last_turn_age_s or 0) >= 1.5, timeout_s=30)
            finally:
                broker.send_signal(signal.SIGCONT)
            wait_until(lambda: (client.liveness().last_turn_age_s or 9) < 1.5, timeout_s=30)
            assert waiting.poll() is None, (tmp_path / "wait.log").read_text()
        workers_factory(count=1)
        assert waiting.wait(timeout=120) == 0, (tmp_path / "wait.log").read_text()
        assert "broker" not in (tmp_path / "wait.log").read_text()
    finally:
        broker.send_signal(signal.SIGCONT)
        assert stop_process(broker) == 0


def test_wait_for_broker_waits_through_a_dead_broker_and_finishes_after_a_restart(
    run_cli: Runner,
    workers_factory,
    conn: redis.Redis,
    prefix: str,
    redis_url: str,
    cli_state: Path,
    tmp_path: Path,
) -> None:
    first = start_broker(redis_url, prefix, cli_state)
    client = BrokerClient(conn, prefix)
    second = None
    log = tmp_path / "wait.log"
    try:
        assert run_cli(*submit_args("s")).returncode == 0  # no worker yet: it stays running
        wait_until(lambda: running(client, "s"), timeout_s=60)
        waiting = follower(redis_url, prefix, cli_state, log, "wait", "s", "--wait-for-broker")
        first.send_signal(signal.SIGKILL)
        first.wait()
        where = f"{socket.gethostname()}:{first.pid}"
        wait_until(lambda: "waiting for a broker" in log.read_text(), timeout_s=60)
        assert f"waiting for a broker on prefix {prefix!r}: the broker on {where} stopped " in (
            log.read_text()
        )
        assert waiting.poll() is None
        second = start_broker(redis_url, prefix, cli_state)  # takes over the dead one's lock
        workers_factory(count=1)
        assert waiting.wait(timeout=120) == 0, log.read_text()
        err = log.read_text()
        assert f"a broker serves prefix {prefix!r} again: the broker on " in err, err
        assert "study 's' finished: 3 trials" in err, err
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
        if second is not None:
            assert stop_process(second) == 0


def test_delete_with_no_broker_serving_says_when_it_applies_without_waiting(
    conn: redis.Redis, prefix: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = Keys(prefix)
    plant(conn, prefix, holder=OLD, turn=(OLD, 40.0))  # killed: its lock outlives it
    conn.hset(keys.status, "done", running_status("done", StudyState.FINISHED).to_json())
    code, out, err = run_main(
        capsys, "--redis-url", redis_url, "--prefix", prefix, "delete", "done", "--timeout", "600"
    )
    assert code == 0, err
    assert steady(out.strip()) == (
        f"study 'done' will be deleted when a broker runs on {prefix!r} (no broker: the broker "
        "on oldhost:4242 stopped Ns ago)"
    )
    assert conn.llen(keys.commands) == 1  # sent, for the next broker
