"""Objectives for the fault tests (`--import tests.support.fault_objectives`).

Each records in Redis, under `key`, what the tests check afterwards:

    KEY:calls      hash: the objective's params (repr of x) -> times it was called with them
    KEY:samples    list: trials running at the moment each one started, counted by the running
                   objectives themselves (the cap, measured where it matters)
    KEY:started    list: "pid ppid" of each call, for tests that kill or freeze that worker
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import redis

from optuna_rq.plumbing.connection import connect
from optuna_rq.plumbing.processes import exited, stopped

_connections: dict[str, redis.Redis] = {}

T = TypeVar("T")


def _conn(url: str) -> redis.Redis:
    if url not in _connections:
        _connections[url] = connect(url, retries=40)  # rides out the Redis outage tests
    return _connections[url]


def running_pid(pid: int) -> bool:
    """True if `pid` runs: not gone, not a zombie, not stopped (a frozen worker runs nothing)."""
    return not exited(pid) and not stopped(pid)


def _recorded(write: Callable[[], T]) -> T:
    """What the objectives record is the tests' instrument, not what they test: it waits out a
    full Redis (tests/processes/faults/test_full_redis.py) rather than fail the trial. A refused
    MULTI/EXEC did nothing, so it is sent again whole."""
    while True:
        try:
            return write()
        except redis.exceptions.OutOfMemoryError:
            time.sleep(0.05)


@contextmanager
def _running(url: str, key: str, x: float) -> Iterator[redis.Redis]:
    conn = _conn(url)
    pid = os.getpid()

    def record() -> Any:
        pipe = conn.pipeline(transaction=True)
        pipe.hincrby(f"{key}:calls", repr(x), 1)
        pipe.rpush(f"{key}:started", f"{pid} {os.getppid()}")
        pipe.sadd(f"{key}:pids", pid)
        pipe.smembers(f"{key}:pids")
        return pipe.execute()[-1]

    members = _recorded(record)
    # Killed or frozen objectives stay in the set: count only the processes that still run.
    running = sum(1 for m in members if running_pid(int(m)))
    _recorded(lambda: conn.rpush(f"{key}:samples", running))
    try:
        yield conn
    finally:
        conn.srem(f"{key}:pids", pid)


def steady(x: float, redis_url: str, key: str, hold_s: float = 0.2) -> float:
    """A well-behaved objective that takes `hold_s`."""
    with _running(redis_url, key, x):
        time.sleep(hold_s)
    return x * x


def gated(x: float, redis_url: str, key: str) -> float:
    """Holds until the test opens the gate (sets `KEY:open`), at most a minute: a run that lasts
    as long as the test looks at it, however slow the machine."""
    with _running(redis_url, key, x) as conn:
        deadline = time.monotonic() + 60
        while not conn.exists(f"{key}:open") and time.monotonic() < deadline:
            time.sleep(0.05)
    return x * x


def offline(x: float, redis_url: str, key: str, gate: str) -> float:
    """Records its start in `KEY:started`, then holds until the file `gate` exists (at most a
    minute) and returns without touching Redis again: a trial a test can end while Redis is
    away, whose result only the worker itself then holds."""
    conn = _conn(redis_url)
    _recorded(lambda: conn.rpush(f"{key}:started", f"{os.getpid()} {os.getppid()}"))
    deadline = time.monotonic() + 60
    while not os.path.exists(gate) and time.monotonic() < deadline:
        time.sleep(0.05)
    return x * x


def with_trial(trial: Any, x: float, redis_url: str, key: str, hold_s: float = 0.05) -> float:
    """A define-by-run objective: one remote-trial call (`set_user_attr`), then `hold_s`."""
    with _running(redis_url, key, x):
        trial.set_user_attr("x", x)
        time.sleep(hold_s)
    return x * x


def infeasible(trial: Any, x: float, redis_url: str, key: str, hold_s: float = 0.05) -> float:
    """A constrained objective whose every trial is infeasible (constraint > 0), as constrained
    studies often start: the study has completed trials and no best one."""
    with _running(redis_url, key, x):
        trial.set_constraint("c", 1.0)
        time.sleep(hold_s)
    return x * x


def churn(x: float, redis_url: str, key: str, hold_s: float = 0.1) -> float:
    """Every fifth call, across all workers, is SIGKILLed mid-trial (by itself)."""
    with _running(redis_url, key, x) as conn:
        if int(conn.incr(f"{key}:starts")) % 5 == 0:
            time.sleep(hold_s / 2)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(hold_s)
    return x * x


def exits(x: float, redis_url: str, key: str) -> float:
    """Leaves the process without a word, as a crashing extension would."""
    with _running(redis_url, key, x):
        os._exit(3)


def stuck_in_c(x: float, redis_url: str, key: str) -> float:
    """Minutes inside one C call that holds the GIL and never checks for signals (builtin sum
    over big ints): no Python signal handler runs, no other thread in this process gets a turn;
    only a kill from outside stops it."""
    with _running(redis_url, key, x):
        sum(range(2**62, 2**62 + 10**10))
    return x


def asks(trial: Any, x: float, redis_url: str, key: str, gate: bool = False) -> float:
    """A define-by-run objective whose `y` comes from a remote-trial call, returned as its value
    (so a told value is what the call answered here, and the storage's `y` what it answered
    there). With `gate`, it waits for the test's go (`KEY:go`) before the call: a test freezes
    the broker first, and kills the process while the reply is on its way."""
    with _running(redis_url, key, x) as conn:
        if gate:
            conn.blpop([f"{key}:go"], timeout=60)
        y: float = trial.suggest_float("y", 0, 1)
    return y
