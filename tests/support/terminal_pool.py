"""`optuna-rq workers` as a terminal runs it, for the tests of how a pool stops: in a session and
process group of its own, so that a Ctrl-C is what a terminal sends (SIGINT to the foreground
process group), with its log in a file the test reads."""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import redis
from rq import Worker

from optuna_rq.plumbing.processes import exited
from optuna_rq.protocol import Keys, trial_queue
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, live_workers

_STARTED = re.compile(r"worker (\d+) started \(pid (\d+)")

STACK_DUMP = "most recent call first"
"""What faulthandler writes above each thread's stack: a stuck child's dump."""


class TerminalPool:
    """One `optuna-rq --redis-url URL --prefix PREFIX workers ARGS...` process."""

    def __init__(
        self,
        redis_url: str,
        prefix: str,
        args: list[str],
        *,
        log: Path,
        env: dict[str, str],
        module: str = "tests.support.objectives",
    ) -> None:
        self.prefix = prefix
        self.module = module
        self.log = log
        argv = ["--redis-url", redis_url, "--prefix", prefix, "workers", "--import", module]
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                cli(*argv, *args), env=env, stderr=out, start_new_session=True
            )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def children(self) -> dict[int, int]:
        """Every worker process the pool started so far: pid -> index."""
        return {int(pid): int(index) for index, pid in _STARTED.findall(self.text())}

    def registered(self, connection: redis.Redis) -> list[Worker]:
        """This pool's workers in RQ's registry (what `rq info` shows)."""
        queue = trial_queue(connection, Keys(self.prefix).trial_queue(self.module))
        workers = Worker.all(connection=connection, queue=queue)
        return [w for w in workers if f".{self.process.pid}." in w.name]  # host.POOLPID.i.gen

    def wait_ready(self, connection: redis.Redis, count: int) -> None:
        """Until `count` workers registered with RQ and the pool's heartbeat counts them."""

        def ready() -> bool:
            assert self.process.poll() is None, f"workers exited with {self.process.returncode}"
            return (
                len(self.registered(connection)) >= count
                and live_workers(connection, self.prefix) >= count
            )

        wait_until(ready, timeout_s=60, message=f"{count} workers did not register")

    def ctrl_c(self) -> None:
        """What a terminal's Ctrl-C does: SIGINT to the foreground process group."""
        os.killpg(self.process.pid, signal.SIGINT)

    def sigterm(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout_s: float = 60) -> int:
        return self.process.wait(timeout=timeout_s)

    def all_gone(self) -> bool:
        return all(exited(pid) for pid in [self.process.pid, *self.children()])

    def kill(self) -> None:
        """Cleanup: whatever is left of the pool and its children, killed."""
        for pid in [self.process.pid, *self.children()]:
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self.process.wait(timeout=30)
