"""Which studies sample off the loop, and the requests the loop has out with the sampler processes.

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

A study has one request out per process at a time: the next is sent after the loop created and
flushed the trials of the last, so that the sampler sees them (and only then drops its scratch
copies). Each trial requested holds a slot and counts against the budget until it is back.

A study with more free slots than its requests out can fill samples in more than one process
(`SamplerPool`: grown one process at a time, up to `--sampler-processes`), as Optuna's own
distributed optimization does: each process has its copy of the sampler (reseeded, past the
first) and sees the trials the others sampled RUNNING once the loop has created them (TPE lies
about them: `constant_liar`, on by default at a cap above 1), so parallel asks spread out. A study
at cap 1 keeps to one process, whose sampler is the loop's own: it samples what `study.optimize`
samples.
"""

from __future__ import annotations

import logging
import math
import pickle
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

from optuna.trial import TrialState

from optuna_rq.dispatch.runs import StudyRun
from optuna_rq.sampling import OFF_LOOP_AT_S, SAMPLES_TO_DECIDE
from optuna_rq.sampling.sampler_messages import Sampled, SampleFailed, SampleRequest
from optuna_rq.sampling.sampler_pool import SamplerPool
from optuna_rq.space.declarations import Suggestion

__all__ = ["OffLoopSampling"]

log = logging.getLogger("optuna_rq.dispatch")

START_AT = 0.75
"""Of `above_s`, where the process starts. Not much lower: even RandomSampler costs the loop a
sizeable fraction of `above_s` a trial (Optuna's suggest path on the journal), and a process
started for a study that never moves costs CPU to start and doubles the broker's memory."""

GROW_WINDOW_S = 2.0
"""The window over which `OffLoopSampling.keep_up` decides whether the processes keep up."""

REQUEST_SPAN_S = 0.25
"""How long one request keeps a process sampling, at most (by the study's recent sampling
times): long enough that the loop turn between two requests costs the process little, short
enough that a process started meanwhile, or another study, gets its share soon."""


@dataclass(slots=True)
class _Request:
    run: StudyRun
    left: int  # trials still to come back
    process: int  # the index of the process sampling them


@dataclass(slots=True)
class _Placement:
    """Where one run samples, as far as the sampler processes are concerned."""

    run: StudyRun  # held, so that its id names no other run while this lives
    off_loop: bool = False  # it samples in the sampler processes
    holders: list[int] = field(default_factory=list)
    """The processes its sampler was sent to, the first with the loop's random state; once it is
    sent, the loop's copy is stale."""
    stays: bool = False  # its sampler cannot be pickled: the loop samples it
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=SAMPLES_TO_DECIDE))
    """Its last trials' sampling time: the loop's CPU while the loop samples it, then the
    process's."""


def _samples_at_ask(inputs: dict[str, Any]) -> bool:
    return any(
        isinstance(v, Suggestion) or (isinstance(v, dict) and _samples_at_ask(v))
        for v in inputs.values()
    )


class OffLoopSampling:
    """The loop's side of the sampler processes (`pool`; None: every study samples on the
    loop). Not thread-safe: the dispatch loop drives it."""

    def __init__(
        self,
        pool: SamplerPool | None,
        above_s: float = OFF_LOOP_AT_S,
        grow_window_s: float = GROW_WINDOW_S,
    ) -> None:
        self.pool = pool
        self.grow_window_s = grow_window_s
        self.above_s = above_s
        """Loop CPU per trial sampled (the median, `SAMPLES_TO_DECIDE`) above which a study
        moves; the process is started at `START_AT` of that, to be ready by then."""
        self._requests: dict[int, _Request] = {}
        self._outbox: list[tuple[int, SampleRequest]] = []  # (process, request)
        self._next_id = 0
        self._placements: dict[int, _Placement] = {}  # id(run) -> where it samples
        self.sampled: Counter[int] = Counter()
        """Trials sampled off the loop, by the index of the process that sampled them."""
        self._window_from = 0.0  # `keep_up`: the window's start, and how long studies were held
        self._held_s = 0.0
        self._held_since: float | None = None

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
        if run.journal is None or run.spec.ask_ahead or self.pool is None:
            return
        self._of(run).recent.append(seconds)
        if not self.pool.started and self._median(run) >= self.above_s * START_AT:
            self.pool.start()

    def takes(self, run: StudyRun) -> bool:
        """Whether `run` samples off the loop now (moving it there if it is time). Not while it
        has enqueued trials: the loop takes those, in order, as `study.ask()` does."""
        if self.pool is None or not self.pool.ready:
            return False
        placement = self._of(run)
        if placement.stays or (placement.holders and not placement.off_loop):
            return False  # moved back: its sampler in the processes has moved on
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
        """Whether `run` has a request out in every process it may use: it asks for no more
        until one is back."""
        return self.samples_off_loop(run) and run.sampling > 0 and self._free_process(run) is None

    def keep_up(self, now: float) -> None:
        """Called once a loop turn: start one more process once the studies have been held up
        (slots free, and a request out in every process they may use) for more than half of
        the last `grow_window_s`. Not at once: two trials ending together hold a study up for
        one ask, which is no reason for a process."""
        if self.pool is None:
            return
        if self._held_since is not None:
            self._held_s += now - self._held_since
        held = any(
            placement.off_loop
            and placement.run.spec.concurrency > 1
            and placement.run.free_slots > 0
            and self.busy(placement.run)
            for placement in self._placements.values()
        )
        self._held_since = now if held else None
        if now - self._window_from >= self.grow_window_s:
            if self._held_s > (now - self._window_from) / 2:
                self.pool.grow()
            self._window_from, self._held_s = now, 0.0

    def request(self, run: StudyRun, free: int) -> None:
        """Ask a process for trials of `run` to fill some of its `free` slots (sent by `send`,
        after the loop's flush): the free slots shared among the processes it may use, and no
        more than `REQUEST_SPAN_S` of sampling."""
        assert run.journal is not None and free > 0 and self.pool is not None
        placement = self._of(run)
        process = self._free_process(run)
        assert process is not None  # `busy` said so
        sampler, reseed = None, False
        if process not in placement.holders:
            try:
                sampler = pickle.dumps(run.study.sampler)
            except Exception as exc:  # a sampler holding a lock, a socket, a lambda: stays here
                placement.stays = True  # never asked to move again
                self._keep_on_loop(run, f"its sampler cannot be pickled ({exc})")
                return
            reseed = bool(placement.holders)  # the loop's random state went to the first
        sharing = len(self._free_processes(run))
        n = math.ceil(free / sharing)
        median = self._median(run)
        if median > 0:
            n = min(n, max(1, int(REQUEST_SPAN_S / median)))
        self._next_id += 1
        self._outbox.append(
            (
                process,
                SampleRequest(
                    request_id=self._next_id,
                    study=run.name,
                    journal=run.journal,
                    inputs=run.spec.inputs,
                    n=n,
                    sampler=sampler,
                    reseed=reseed,
                ),
            )
        )
        if process not in placement.holders:
            placement.holders.append(process)
        self._requests[self._next_id] = _Request(run, n, process)
        run.request_samples(n)

    @property
    def has_outbox(self) -> bool:
        return bool(self._outbox)

    def send(self) -> None:
        """Hand the requests over: after what they stand on (the trials recorded) is durable."""
        outbox, self._outbox = self._outbox, []
        for process, request in outbox:
            if self.pool is None or not self.pool.send(process, request):
                self._back_to_loop()
                return

    def take(self) -> list[tuple[StudyRun, Sampled | SampleFailed]]:
        """The trials sampled since the last call, with their runs (requests forgotten, their
        answers are dropped: those trials were never created)."""
        if self.pool is None or not self.pool.started:
            return []
        answers = []
        for process, answer in self.pool.replies():
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
            else:
                self._of(request.run).recent.append(answer.sample_s)
                self.sampled[process] += 1
            answers.append((request.run, answer))
        if self.pool.failed:
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
        if self.pool is not None:
            self.pool.stop()

    def _free_processes(self, run: StudyRun) -> list[int]:
        """The ready processes `run` may have a request in and has none: at cap 1, only the one
        its sampler went to first (its random state is the loop's; a reseeded copy would sample
        otherwise than `study.optimize`)."""
        if self.pool is None:
            return []
        placement = self._of(run)
        ready = self.pool.ready
        if run.spec.concurrency <= 1 and placement.holders:
            ready = [p for p in ready if p == placement.holders[0]]
        busy = {r.process for r in self._requests.values() if r.run is run}
        return [p for p in ready if p not in busy]

    def _free_process(self, run: StudyRun) -> int | None:
        """Where `run`'s next request goes: the free process with the fewest requests out (of
        any study), one that has its sampler already before one that would need a copy."""
        free = self._free_processes(run)
        if not free:
            return None
        holders = self._of(run).holders
        load = Counter(request.process for request in self._requests.values())
        return min(free, key=lambda p: (load[p], p not in holders, p))

    def _median(self, run: StudyRun) -> float:
        """The median sampling time of `run`'s last trials sampled (`_Placement.recent`); -1
        until there are enough."""
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
        """The processes are gone: every study samples on the loop, what was out is unspent."""
        for request in self._requests.values():
            request.run.drop_samples(request.left)
            self._of(request.run).off_loop = False
        self._requests.clear()
        self._outbox.clear()
        if self.pool is not None:
            self.pool.stop()
        self.pool = None
