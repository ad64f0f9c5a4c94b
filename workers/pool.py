"""Start, supervise and stop N worker processes that serve trials from one RQ queue.

Each process runs a `TrialWorker`: an RQ `SimpleWorker` (no fork per job: a trial costs no
process start) that refuses any job but ours. The parent imports the served modules first, so a
typo stops the command at once, then keeps N children alive until SIGTERM/SIGINT, which it
passes on once: each child finishes its running trial, then exits.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from rq import Queue, SimpleWorker
from rq.job import Job

from broker.connection import connect
from broker.protocol import DEFAULT_MAX_MESSAGE_BYTES
from broker.signing import Signer
from workers import runner
from workers.serializer import MsgpackSerializer

__all__ = ["TrialWorker", "WorkerPool", "WorkerSettings", "trial_queue"]

log = logging.getLogger("optuna_rq.pool")

_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"


@dataclass(frozen=True, kw_only=True)
class WorkerSettings:
    """What a pool of workers serves and where it listens."""

    redis_url: str
    queue: str
    modules: tuple[str, ...]
    count: int = 1
    log_level: str = "INFO"
    restart_backoff_s: float = 1.0
    secret: bytes | None = field(default=None, repr=False)  # signs messages when set
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    metrics_port: int | None = None  # worker i serves Prometheus metrics on metrics_port + i


def trial_queue(connection: Any, name: str) -> Queue:
    """The RQ queue trials travel on, with our serializer: the one way both sides make it."""
    return Queue(name, connection=connection, serializer=MsgpackSerializer)


class TrialWorker(SimpleWorker):
    """An RQ worker that runs our trial job function and nothing else."""

    def execute_job(self, job: Job, queue: Queue) -> None:
        try:
            func_name = job.func_name
        except Exception as exc:  # data that is not msgpack: never unpickled, never run
            self._refuse(job, queue, f"job data does not decode: {type(exc).__name__}: {exc}")
            return
        if func_name != runner.RUN_TRIAL:
            self._refuse(job, queue, f"refused job function {func_name!r}: only trials run here")
            return
        super().execute_job(job, queue)

    def _refuse(self, job: Job, queue: Queue, why: str) -> None:
        log.error("job %s %s", job.id, why)
        self.handle_job_failure(job, queue, exc_string=why)


def _child_main(settings: WorkerSettings, index: int) -> None:
    """One worker process: its own process group, so a terminal's Ctrl-C reaches only the parent,
    which then stops each child exactly once (a second signal would be RQ's cold shutdown)."""
    os.setpgid(0, 0)
    logging.basicConfig(level=settings.log_level, format=_LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("rq").setLevel(logging.WARNING)  # one line per trial is ours to write
    runner.serve(settings.modules)
    runner.use_signer(Signer(settings.secret, max_message_bytes=settings.max_message_bytes))
    if settings.metrics_port is not None:
        runner.serve_metrics(settings.metrics_port + index)
    connection = connect(settings.redis_url)
    worker = TrialWorker(
        [trial_queue(connection, settings.queue)],
        connection=connection,
        serializer=MsgpackSerializer,
    )
    worker.work(logging_level="WARNING")


class WorkerPool:
    """N supervised worker processes. `run()` blocks until stopped by a signal or `stop()`."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self._context = multiprocessing.get_context("spawn")
        self._children: dict[int, multiprocessing.process.BaseProcess] = {}
        self._stopping = False

    def start(self) -> None:
        runner.serve(self.settings.modules)  # fail here, in the command, not in N children
        for index in range(self.settings.count):
            self._start_child(index)

    def _start_child(self, index: int) -> None:
        process = self._context.Process(
            target=_child_main, args=(self.settings, index), name=f"optuna-rq-worker-{index}"
        )
        process.start()
        self._children[index] = process
        log.info("worker %d started (pid %s)", index, process.pid)

    def stop(self, *_: object) -> None:
        """Ask every child to finish its running trial and exit (idempotent)."""
        if self._stopping:
            return
        self._stopping = True
        log.info("stopping %d workers after their running trials", len(self._children))
        for process in self._children.values():
            if process.pid is not None and process.is_alive():
                os.kill(process.pid, signal.SIGTERM)

    def run(self) -> int:
        """Start the children and supervise them until stopped; returns an exit code."""

        def on_signal(signum: int, frame: FrameType | None) -> None:
            self.stop()

        previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            while not self._stopping:
                sentinels = [p.sentinel for p in self._children.values()]
                multiprocessing.connection.wait(sentinels, timeout=1.0)
                for index, process in list(self._children.items()):
                    if not self._stopping and not process.is_alive():
                        log.warning(
                            "worker %d (pid %s) exited with code %s; restarting it",
                            index,
                            process.pid,
                            process.exitcode,
                        )
                        time.sleep(self.settings.restart_backoff_s)
                        self._start_child(index)
            for process in self._children.values():
                process.join()
            log.info("all workers stopped")
            return 0
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
