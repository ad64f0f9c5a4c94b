"""Inline workers: every trial job enqueued on a test's queues runs in the test's own process, as
RQ's burst workers and dramatiq's `StubBroker` run jobs in tests.

Each worker is the pool's own RQ worker class (`TrialWorker`, RQ's `SimpleWorker`) taking jobs in
burst mode, again and again, in a thread of the test's process, under a `WorkerContext` serving the
modules asked for; a heartbeat says the pool is live, as a real pool's does, so the broker's fair
share and `status` count its workers. What this cannot show is what a process shows (signals,
crashes, a trial timeout's alarm, a fresh interpreter): tests of those use `workers_factory`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from rq.timeouts import TimerDeathPenalty

from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import DEFAULT_LEASE_TTL_S, Keys, Role, Signer
from optuna_rq.workers import context, loader
from optuna_rq.workers.pool_heartbeat import Heartbeat
from optuna_rq.workers.rq_worker import TrialWorker, new_worker

IDLE_S = 0.02
"""How long a worker waits between two bursts that found its queues empty."""


class InlineWorkers:
    """Workers in threads of this process; `start` as `workers_factory`'s."""

    def __init__(self, redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.redis_url = redis_url
        self.prefix = prefix
        self.monkeypatch = monkeypatch
        self.stop = threading.Event()
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self.heartbeat: Heartbeat | None = None

    def start(
        self,
        count: int = 2,
        modules: tuple[str, ...] = ("tests.support.objectives",),
        env: dict[str, str] | None = None,
    ) -> str:
        """`count` workers serving `modules` on the default resource class; returns the prefix.
        `env`: the workers' signing settings (`OPTUNA_RQ_SECRET`, a key file), as a pool's."""
        assert not self.threads, "inline workers are started once per test"
        signer = Signer.from_env(Role.WORKER, env or {})
        self.monkeypatch.setattr(
            context,
            "_installed",
            context.WorkerContext(served=loader.serve(modules), signer=signer),
        )
        keys = Keys(self.prefix)
        queues = [keys.trial_queue(module, "default") for module in modules]
        connection = connect(self.redis_url)
        self.heartbeat = Heartbeat(
            connection, keys, signer, queues=queues, ttl_s=DEFAULT_LEASE_TTL_S
        )
        self.heartbeat.beat(time.monotonic(), workers=count, busy=0, force=True)
        for index in range(count):
            worker = new_worker("process", connect(self.redis_url), queues, name=f"inline-{index}")
            self.threads.append(
                threading.Thread(target=self._work, args=(worker, count), daemon=True)
            )
        for thread in self.threads:
            thread.start()
        return self.prefix

    def _work(self, worker: TrialWorker, count: int) -> None:
        # Signal handlers belong to the main thread, and RQ's alarm to a process of its own: a
        # thread arms neither.
        worker._install_signal_handlers = lambda: None  # type: ignore[method-assign]
        worker.death_penalty_class = TimerDeathPenalty
        try:
            while not self.stop.is_set():
                worker.work(burst=True, logging_level="WARNING")
                if self.heartbeat is not None:
                    self.heartbeat.beat(time.monotonic(), workers=count, busy=0)
                self.stop.wait(IDLE_S)
        except BaseException as exc:  # the test fails at teardown, naming it
            self.errors.append(exc)

    def close(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "an inline worker did not finish its trial in 60 s"
        if self.heartbeat is not None:
            self.heartbeat.stop()
        assert not self.errors, f"an inline worker failed: {self.errors[0]!r}"


@pytest.fixture
def inline_workers(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> Iterator[InlineWorkers]:
    """Workers that run each trial job in this process (`InlineWorkers.start`)."""
    workers = InlineWorkers(redis_url, prefix, monkeypatch)
    yield workers
    workers.close()
