"""The broker's handle on its sampler process: started when a study first samples slowly, ready
once it has imported what it needs, and gone (the loop samples again) if it dies."""

from __future__ import annotations

import logging
import multiprocessing
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

from optuna_rq.sampling.sampler_messages import READY, Sampled, SampleFailed, SampleRequest

__all__ = ["SamplerProcess"]

log = logging.getLogger("optuna_rq.broker")

STOP_TIMEOUT_S = 5.0


class SamplerProcess:
    """One child process (spawned: it shares nothing with the broker's threads) that samples
    on the broker's journal files. Not thread-safe: the dispatch loop drives it."""

    def __init__(
        self, redis_url: str, password: str | None, wake_stream: str, *, index: int = 0
    ) -> None:
        self._args = (redis_url, password, wake_stream)
        self.index = index
        """Its place in the broker's `SamplerPool`: names it in the logs and the process list."""
        self._process: BaseProcess | None = None
        self._pipe: Connection | None = None
        self.ready = False
        """Whether it answers requests (it imported Optuna and reached Redis)."""
        self.failed: str | None = None
        """Why it is gone for good: the loop samples every study again."""

    @property
    def started(self) -> bool:
        return self._process is not None

    @property
    def pid(self) -> int | None:
        """Its process id, while it runs."""
        return None if self._process is None else self._process.pid

    def start(self) -> None:
        """Start it (once); it is `ready` when `replies` has seen it say so."""
        if self._process is not None or self.failed:
            return
        from optuna_rq.sampling.sampler_main import serve

        context = multiprocessing.get_context("spawn")
        ours, theirs = context.Pipe()
        process = context.Process(
            target=serve,
            args=(theirs, *self._args),
            name=f"optuna-rq sampler {self.index}",
            daemon=True,
        )
        process.start()
        theirs.close()
        self._process, self._pipe = process, ours
        log.info(
            "sampler process %d (pid %d) started: slow samplers sample there",
            self.index,
            process.pid,
        )

    def send(self, request: SampleRequest) -> bool:
        """Hand `request` over; False if the process is gone (see `failed`)."""
        if not self.ready or self._pipe is None:
            return False
        try:
            self._pipe.send(request)
        except OSError as exc:
            self._gone(f"the pipe to it broke: {exc}")
            return False
        return True

    def replies(self) -> list[Sampled | SampleFailed]:
        """What it answered since the last call (never waits). Empty, and `failed` set, once it
        is gone."""
        answers: list[Sampled | SampleFailed] = []
        if self._pipe is None:
            return answers
        try:
            while self._pipe.poll():
                answer = self._pipe.recv()
                if answer == READY:
                    self.ready = True
                    log.info("sampler process %d ready", self.index)
                else:
                    answers.append(answer)
        except (EOFError, OSError):
            code = None if self._process is None else self._process.exitcode
            self._gone(f"it exited (code {code})")
        return answers

    def stop(self) -> None:
        """End it: asked to, then killed if it does not within `STOP_TIMEOUT_S`."""
        process, pipe = self._process, self._pipe
        self._process, self._pipe, self.ready = None, None, False
        if process is None or pipe is None:
            return
        try:
            pipe.send(None)
        except OSError:
            pass
        pipe.close()
        process.join(STOP_TIMEOUT_S)
        if process.exitcode is None:
            process.kill()
            process.join(STOP_TIMEOUT_S)

    def _gone(self, why: str) -> None:
        self.failed = why
        log.error(
            "sampler process %d is gone (%s): studies sample on the loop again",
            self.index,
            why,
        )
        self.stop()
