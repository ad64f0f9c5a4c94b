"""The broker's sampler processes: the first started when a study first samples slowly, one more
each time the studies ask for more trials than the started ones can sample, up to `most`
(`optuna-rq broker --sampler-processes`). If one of them dies they all stop, and the loop samples
every study again: a study's sampler lives in the processes it was sent to, and starting over on
the loop is the one state that needs no bookkeeping of which copies were lost."""

from __future__ import annotations

import logging

from optuna_rq.sampling.sampler_messages import Sampled, SampleFailed, SampleRequest
from optuna_rq.sampling.sampler_process import SamplerProcess

__all__ = ["SamplerPool"]

log = logging.getLogger("optuna_rq.broker")


class SamplerPool:
    """Up to `most` `SamplerProcess`es, known by their index (a study's sampler lives in some of
    them). Not thread-safe: the dispatch loop drives it."""

    def __init__(self, redis_url: str, password: str | None, wake_stream: str, most: int) -> None:
        if most < 1:
            raise ValueError(f"a sampler pool needs at least one process, not {most}")
        self._args = (redis_url, password, wake_stream)
        self.most = most
        self.processes: list[SamplerProcess] = []
        self.failed: str | None = None
        """Why they are all gone: the loop samples every study again."""

    @property
    def started(self) -> bool:
        return bool(self.processes)

    @property
    def ready(self) -> list[int]:
        """The processes that answer requests, by index (none once the pool failed)."""
        if self.failed:
            return []
        return [index for index, process in enumerate(self.processes) if process.ready]

    def start(self) -> None:
        """Start the first process, if none is."""
        if not self.processes and not self.failed:
            self._add()

    def grow(self) -> bool:
        """Start one more process, if there are fewer than `most` and none is still starting
        (a process that is not ready yet is the growth already under way)."""
        if (
            self.failed
            or not self.processes
            or len(self.processes) >= self.most
            or not all(process.ready for process in self.processes)
        ):
            return False
        log.info(
            "studies wait on the sampler processes: starting one more (%d of at most %d)",
            len(self.processes) + 1,
            self.most,
        )
        self._add()
        return True

    def send(self, index: int, request: SampleRequest) -> bool:
        """Hand `request` to process `index`; False if the pool failed (see `failed`)."""
        if self.failed:
            return False
        process = self.processes[index]
        if not process.send(request):
            self._fail(index, process.failed or "it is not ready")
            return False
        return True

    def replies(self) -> list[tuple[int, Sampled | SampleFailed]]:
        """What the processes answered since the last call, each with the index of the one that
        answered (never waits). Empty, and `failed` set, once one of them is gone."""
        answers: list[tuple[int, Sampled | SampleFailed]] = []
        for index, process in enumerate(self.processes):
            answers += [(index, answer) for answer in process.replies()]
            if process.failed:
                self._fail(index, process.failed)
                return []
        return answers

    def stop(self) -> None:
        for process in self.processes:
            process.stop()

    def _add(self) -> None:
        process = SamplerProcess(*self._args, index=len(self.processes))
        self.processes.append(process)
        process.start()

    def _fail(self, index: int, why: str) -> None:
        self.failed = f"sampler process {index}: {why}"
        self.stop()
