"""A pool stops promptly: SIGTERM, or a terminal's Ctrl-C, to `optuna-rq workers` with nothing
running ends every worker process at once and the pool with exit 0, never through the stuck path
(a warning, the child's stacks, a kill), and leaves RQ's registry and the pool's heartbeat as
they were before it ran. Each signal is tried over several rounds, each after trials ran (the
state in which a child used to hang in RQ's pub/sub teardown)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import redis

from tests.support.helpers import wait_until
from tests.support.terminal_pool import STACK_DUMP, TerminalPool
from tests.support.worker_processes import cli_env, live_workers

pytestmark = pytest.mark.timeout(300)

ROUNDS = 3

SAID = {"sigterm": "SIGTERM", "ctrl_c": "Ctrl-C"}  # how the pool names what stopped it
NEXT = {"sigterm": "a second SIGTERM or Ctrl-C", "ctrl_c": "press Ctrl-C again"}


@pytest.mark.parametrize("how", ["sigterm", "ctrl_c"])
def test_an_idle_pool_stops_at_once_with_no_stuck_child(
    how: str,
    redis_url: str,
    prefix: str,
    conn: redis.Redis,
    broker_process: object,
    run_cli: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> None:
    for round_ in range(ROUNDS):
        pool = TerminalPool(
            redis_url, prefix, ["--count", "2"], log=tmp_path / f"pool{round_}.log", env=cli_env()
        )
        try:
            pool.wait_ready(conn, 2)
            workers = pool.registered(conn)
            # No worker listens on RQ's command channel: nothing to unsubscribe on the way out.
            channels = [w.pubsub_channel_name for w in workers]
            assert conn.pubsub_numsub(*channels) == [(c.encode(), 0) for c in channels]
            done = run_cli(
                "submit",
                "tests.support.objectives:quadratic",
                "--study-name",
                f"s{round_}",
                "--param",
                "x={type: float, low: -1, high: 1}",
                "--n-trials",
                "4",
                "--concurrency",
                "2",
                "--wait",
            )
            assert done.returncode == 0, done.stderr
            idle = pool.registered  # bound now: the lambda below reads this round's pool
            wait_until(
                lambda idle=idle: all(w.get_state() == "idle" for w in idle(conn)),
                timeout_s=30,
                message="the workers are not idle",
            )

            pool.ctrl_c() if how == "ctrl_c" else pool.sigterm()
            assert pool.wait(timeout_s=60) == 0, pool.text()
        finally:
            if pool.process.poll() is None:
                pool.kill()
        text = pool.text()
        assert "stuck" not in text and STACK_DUMP not in text, text
        assert f"{SAID[how]}: warm shutdown, 2 workers idle, stopping now" in text, text
        assert f"{NEXT[how]} for a cold shutdown" in text, text  # what the next one does
        assert "all workers stopped" in text, text
        assert len(pool.children()) == 2 and pool.all_gone(), text
        assert pool.registered(conn) == []  # RQ's registry: gone as they went
        assert live_workers(conn, prefix) == 0


def test_a_pool_stopped_while_it_imports_starts_no_worker_and_exits(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Ctrl-C while the pool imports what it serves (a slow import: torch, say): no worker
    process starts afterwards, and the pool exits 0 (it used to start them, never tell them to
    stop, and wait for them for good)."""
    for round_ in range(ROUNDS):
        gate = tmp_path / f"gate{round_}"
        pool = TerminalPool(
            redis_url,
            prefix,
            ["--count", "2"],
            log=tmp_path / f"pool{round_}.log",
            env=cli_env(OPTUNA_RQ_TEST_IMPORT_GATE=str(gate)),
            module="tests.support.slow_import",
        )
        try:
            wait_until(lambda gate=gate: Path(f"{gate}.importing").exists(), timeout_s=60)
            pool.ctrl_c()
            wait_until(lambda pool=pool: "warm shutdown" in pool.text(), timeout_s=30)
            gate.touch()
            assert pool.wait(timeout_s=60) == 0, pool.text()
        finally:
            if pool.process.poll() is None:
                pool.kill()
        text = pool.text()
        assert "Ctrl-C: warm shutdown, no worker started yet" in text, text
        assert pool.children() == {} and "all workers stopped" in text, text


def test_a_pool_stopped_while_it_starts_its_workers_stops_every_one(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """Ctrl-C as the first worker process has started and the others are being spawned (each
    still importing what it serves): every one is stopped, those spawned after the signal too,
    and the pool exits 0."""
    for round_ in range(ROUNDS):
        gate = tmp_path / f"gate{round_}"
        pool = TerminalPool(
            redis_url,
            prefix,
            ["--count", "4"],
            log=tmp_path / f"pool{round_}.log",
            env=cli_env(OPTUNA_RQ_TEST_CHILD_IMPORT_GATE=str(gate)),
            module="tests.support.slow_import",
        )
        try:
            wait_until(lambda pool=pool: pool.children(), timeout_s=60, interval_s=0.001)
            pool.ctrl_c()
            assert pool.wait(timeout_s=60) == 0, pool.text()
        finally:
            gate.touch()
            if pool.process.poll() is None:
                pool.kill()
        text = pool.text()
        assert "Ctrl-C: warm shutdown" in text and "all workers stopped" in text, text
        assert pool.all_gone() and "stuck" not in text, text
