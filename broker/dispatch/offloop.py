"""Which studies sample off the loop, and the requests the loop has out with the sampler process.

A study moves off the loop when sampling one trial there (ask and `process()`) takes more than
`above_s` of the loop's CPU time, the median of its last `SAMPLES_TO_DECIDE` trials
(`OFF_LOOP_AT_S` by default, `optuna-rq broker --off-loop-above`: TPE past its startup trials,
GP, CMA-ES), its space is sampled at the ask (suggestions in its inputs: a define-by-run
objective samples in its own calls), it keeps nothing asked ahead, and its storage is a journal
file the sampler process can read. The process is started once a study samples `START_AT` of
that slowly, so that it is ready when needed (starting it is slow: a Python process that
imports Optuna); until it is, the loop samples. A study that moved stays moved (its sampler,
random state and all, went with it), unless the process dies or cannot sample it: then the loop
samples it again.

A study has one request out at a time: the next is sent after the loop created and flushed the
trials of the last, so that the sampler sees them (and only then drops its scratch copies). Each
trial requested holds a slot and counts against the budget until it is back.
"""

from __future__ import annotations

import logging
import pickle
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from optuna_rq.dispatch.runs import StudyRun
from optuna_rq.sampling import OFF_LOOP_AT_S, SAMPLES_TO_DECIDE
from optuna_rq.sampling.sampler_messages import Sampled, SampleFailed, SampleRequest
from optuna_rq.sampling.sampler_process import SamplerProcess
from optuna_rq.space.declarations import Suggestion

__all__ = ["OffLoopSampling"]

log = logging.getLogger("optuna_rq.dispatch")

START_AT = 0.75
"""Of `above_s`, where the process starts. Not much lower: even RandomSampler costs the loop a
sizeable fraction of `above_s` a trial (Optuna's suggest path on the journal), and a process
started for a study that never moves costs CPU to start and doubles the broker's memory."""


@dataclass(slots=True)
class _Request:
    run: StudyRun
    left: int  # trials still to come back


@dataclass(slots=True)
class _Placement:
    """Where one run samples, as far as the sampler process is concerned."""

    run: StudyRun  # held, so that its id names no other run while this lives
    off_loop: bool = False  # it samples in the sampler process
    sampler_moved: bool = False  # its sampler went to that process (and is stale here)
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES_TO_DECIDE))
    """Its last trials' loop CPU, while the loop samples it."""


def _samples_at_ask(inputs: dict[str, Any]) -> bool:
    return any(
        isinstance(v, Suggestion) or (isinstance(v, dict) and _samples_at_ask(v))
        for v in inputs.values()
    )


class OffLoopSampling:
    """The loop's side of the sampler process (`process`; None: every study samples on the
    loop). Not thread-safe: the dispatch loop drives it."""

    def __init__(self, process: SamplerProcess | None, above_s: float = OFF_LOOP_AT_S) -> None:
        self.process = process
        self.above_s = above_s
        """Loop CPU per trial sampled (the median, `SAMPLES_TO_DECIDE`) above which a study
        moves; the process is started at `START_AT` of that, to be ready by then."""
        self._requests: dict[int, _Request] = {}
        self._outbox: list[SampleRequest] = []
        self._next_id = 0
        self._placements: dict[int, _Placement] = {}  # id(run) -> where it samples

    def _of(self, run: StudyRun) -> _Placement:
        placement = self._placements.get(id(run))
        if placement is None or placement.run is not run:
            placement = self._placements[id(run)] = _Placement(run)
        return placement

    def samples_off_loop(self, run: StudyRun) -> bool:
        """Whether `run` samples in the sampler process."""
        placement = self._placements.get(id(run))
        return placement is not None and placement.run is run and placement.off_loop

    def note(self, run: StudyRun, seconds: float) -> None:
        """The loop sampled one trial of `run` in `seconds` of its CPU time."""
        if run.journal is None or run.spec.ask_ahead or self.process is None:
            return
        self._of(run).recent.append(seconds)
        if not self.process.started and self._median(run) >= self.above_s * START_AT:
            self.process.start()

    def takes(self, run: StudyRun) -> bool:
        """Whether `run` samples off the loop now (moving it there if it is time). Not while it
        has enqueued trials: the loop takes those, in order, as `study.ask()` does."""
        if self.process is None or not self.process.ready:
            return False
        placement = self._of(run)
        if placement.sampler_moved and not placement.off_loop:
            return False  # moved back: its sampler in the process has moved on
        if not placement.off_loop and (
            run.journal is None
            or run.spec.ask_ahead
            or self._median(run) < self.above_s
            or not _samples_at_ask(run.spec.inputs)
        ):
            return False
        if run.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return False
        if not placement.off_loop:
            placement.off_loop = True
            log.info("study %r samples in the sampler process from now on", run.name)
        return True

    def busy(self, run: StudyRun) -> bool:
        """Whether `run` has a request out: it asks for no more until that one is back."""
        return self.samples_off_loop(run) and run.sampling > 0

    def request(self, run: StudyRun, n: int) -> None:
        """Ask the process for `n` trials of `run` (sent by `send`, after the loop's flush)."""
        assert run.journal is not None and n > 0 and not run.sampling
        placement = self._of(run)
        sampler = None
        if not placement.sampler_moved:
            try:
                sampler = pickle.dumps(run.study.sampler)
            except Exception as exc:  # a sampler holding a lock, a socket, a lambda: stays here
                placement.sampler_moved = True  # never asked to move again
                self._keep_on_loop(run, f"its sampler cannot be pickled ({exc})")
                return
        self._next_id += 1
        self._outbox.append(
            SampleRequest(
                request_id=self._next_id,
                study=run.name,
                journal=run.journal,
                inputs=run.spec.inputs,
                n=n,
                sampler=sampler,
            )
        )
        placement.sampler_moved = True
        self._requests[self._next_id] = _Request(run, n)
        run.request_samples(n)

    @property
    def has_outbox(self) -> bool:
        return bool(self._outbox)

    def send(self) -> None:
        """Hand the requests over: after what they stand on (the trials recorded) is durable."""
        outbox, self._outbox = self._outbox, []
        for request in outbox:
            if self.process is None or not self.process.send(request):
                self._back_to_loop()
                return

    def take(self) -> list[tuple[StudyRun, Sampled | SampleFailed]]:
        """The trials sampled since the last call, with their runs (requests forgotten, their
        answers are dropped: those trials were never created)."""
        if self.process is None or not self.process.started:
            return []
        answers = []
        for answer in self.process.replies():
            request = self._requests.get(answer.request_id)
            if request is None:
                continue
            request.left -= 1
            failed = isinstance(answer, SampleFailed)
            request.run.sample_returned(failed=failed)  # failed: the loop asks it
            if not request.left:
                del self._requests[answer.request_id]
            if isinstance(answer, SampleFailed):
                self._keep_on_loop(request.run, answer.error)
            answers.append((request.run, answer))
        if self.process.failed:
            self._back_to_loop()
        return answers

    def forget(self, run: StudyRun) -> None:
        """`run` wants nothing more from the process: what it has out is dropped, unspent.
        Where it samples is kept, for as long as it is dispatched (`drop`)."""
        for request_id, request in list(self._requests.items()):
            if request.run is run:
                run.drop_samples(request.left)
                del self._requests[request_id]
        placement = self._placements.get(id(run))
        if placement is not None and placement.run is run:
            placement.recent.clear()

    def drop(self, run: StudyRun) -> None:
        """`run` is no longer dispatched: nothing of it stays."""
        self.forget(run)
        placement = self._placements.get(id(run))
        if placement is not None and placement.run is run:
            del self._placements[id(run)]

    def close(self) -> None:
        if self.process is not None:
            self.process.stop()

    def _median(self, run: StudyRun) -> float:
        """The median loop CPU of `run`'s last trials sampled; -1 until there are enough."""
        recent = self._of(run).recent
        if len(recent) < SAMPLES_TO_DECIDE:
            return -1.0
        return sorted(recent)[SAMPLES_TO_DECIDE // 2]

    def _keep_on_loop(self, run: StudyRun, why: str) -> None:
        placement = self._of(run)
        if placement.off_loop:
            log.warning("study %r samples on the loop again: %s", run.name, why)
        placement.off_loop = False

    def _back_to_loop(self) -> None:
        """The process is gone: every study samples on the loop, what was out is unspent."""
        for request in self._requests.values():
            request.run.drop_samples(request.left)
            self._of(request.run).off_loop = False
        self._requests.clear()
        self._outbox.clear()
        self.process = None
