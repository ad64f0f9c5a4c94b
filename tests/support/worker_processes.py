"""Real worker processes for tests, started through the CLI as a user would start them."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import pytest
import redis
from rq import Worker

from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import Keys, Role, Signer, live_pools
from tests.support.helpers import wait_until

PROJECT_ROOT = Path(__file__).resolve().parents[2]

WorkersFactory = Callable[..., str]


def cli_env(**extra: str) -> dict[str, str]:
    """The environment a CLI subprocess gets: ours, with the project on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def cli(*args: str) -> list[str]:
    """argv for `optuna-rq ARGS...` run by this interpreter."""
    return [sys.executable, "-m", "optuna_rq.cli.app", *args]


def stop_process(process: subprocess.Popen[bytes], *, timeout_s: float = 30) -> int:
    """SIGTERM, then wait; a process that ignores it is killed and the test fails."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise AssertionError(f"{process.args} ignored SIGTERM for {timeout_s}s") from None
    return process.returncode


def live_workers(connection: redis.Redis, prefix: str, signer: Signer | None = None) -> int:
    """Workers of the pools on `prefix` whose heartbeat is current."""
    return sum(p.workers for p in live_pools(connection, Keys(prefix), signer or Signer()))


@pytest.fixture
def workers_factory(redis_url: str, prefix: str) -> Iterator[WorkersFactory]:
    """Start `optuna-rq workers` on the test's own prefix; returns the prefix.

    Waits until the pool's heartbeat counts its workers and every worker has registered with
    RQ, so a test starts with its workers ready; at teardown they are stopped with SIGTERM and
    must exit cleanly.
    """
    started: list[subprocess.Popen[bytes]] = []
    connection = connect(redis_url)

    def start(
        count: int = 2,
        modules: tuple[str, ...] = ("tests.support.objectives",),
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> str:
        argv = ["--redis-url", redis_url, "--prefix", prefix, "workers", "--count", str(count)]
        for module in modules:
            argv += ["--import", module]
        process = subprocess.Popen(cli(*argv, *args), env=cli_env(**(env or {})))
        started.append(process)
        expected = count * len(started)
        # Reads their heartbeats as they sign them: with their secret or their key, if any.
        signer = Signer.from_env(Role.WORKER, env or {})
        # A worker listens to all its queues: the first module's queue in any of its classes.
        queues = [q for i, q in enumerate(args) if i and args[i - 1] in ("--queue", "-q")]
        first = Keys(prefix).trial_queue(modules[0], (queues or ["default"])[0])

        def ready() -> bool:
            assert process.poll() is None, f"workers exited with {process.returncode}"
            registered = Worker.all(connection=connection, queue=_queue(connection, first))
            return live_workers(connection, prefix, signer) >= expected and (
                len(registered) >= count
            )

        wait_until(ready, timeout_s=60, message=f"{count} workers did not register")
        return prefix

    yield start

    codes = [stop_process(p) for p in started]
    assert codes == [0] * len(codes), f"workers exited with {codes}"


@pytest.fixture
def cli_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A state directory for the CLI processes of one test (the broker's journal lives here)."""
    return tmp_path_factory.mktemp("state")


@pytest.fixture
def run_cli(
    redis_url: str, prefix: str, cli_state: Path
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `optuna-rq --redis-url URL --prefix PREFIX ARGS...` to completion."""

    def run(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            cli("--redis-url", redis_url, "--prefix", prefix, *args),
            env=cli_env(OPTUNA_RQ_STATE_DIR=str(cli_state)),
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    return run


def start_broker(
    redis_url: str,
    prefix: str,
    state: Path,
    *args: str,
    stderr: IO[bytes] | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`optuna-rq broker ARGS...` on `prefix` (`env` added to its environment), returned once
    it holds the broker lock."""
    connection = connect(redis_url)
    process = subprocess.Popen(
        cli("--redis-url", redis_url, "--prefix", prefix, "broker", *args),
        env=cli_env(OPTUNA_RQ_STATE_DIR=str(state), **(env or {})),
        stderr=stderr,
    )

    def holds_lock() -> bool:
        assert process.poll() is None, f"broker exited with {process.returncode}"
        return bool(connection.exists(f"{prefix}:broker"))

    try:
        wait_until(holds_lock, timeout_s=30, message="the broker did not start")
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        connection.close()
    return process


@pytest.fixture
def broker_process(
    redis_url: str, prefix: str, cli_state: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`optuna-rq broker` for this test's prefix, running once it holds the broker lock."""
    process = start_broker(redis_url, prefix, cli_state)
    yield process
    assert stop_process(process) == 0


def _queue(connection: object, name: str) -> object:
    from optuna_rq.protocol import trial_queue

    return trial_queue(connection, name)
