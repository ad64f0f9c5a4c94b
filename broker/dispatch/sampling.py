"""Sampling off the loop: trials are asked (`study.ask()`) and their params sampled (`process()`,
sealed into a request) on a thread of their own, so that a slow sampler (TPE, some thousands of
trials in) never holds back what the loop does meanwhile: results told, acknowledgements, lease
checks, remote-trial calls answered.

The loop stays the only owner of its runs. It requests asks (`request`), each for a slot it
holds free or a trial it keeps asked ahead, and takes what was sampled (`take`), in the order
sampled; this thread reads nothing of a run but its study and inputs, and writes only to the
study (which Optuna's storages serialize, as they do for `study.optimize(n_jobs=...)`). One ask
at a time, one per study per pass round the studies wanting some, so that a slow sampler holds
up no other study for more than one ask.

While the loop waits on the result stream (`blocking`), a trial sampled wakes it (`wake`: an
entry on that stream), so a trial goes out as soon as it is sampled and the loop never polls.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import optuna

from optuna_rq import failpoints
from optuna_rq.dispatch.runs import StudyRun

__all__ = ["STOP_WAIT_S", "SWITCH_INTERVAL_S", "Sampled", "SamplingThread", "sample"]

log = logging.getLogger("optuna_rq.dispatch")

SWITCH_INTERVAL_S = 0.0005
"""The interpreter's switch interval in the broker process (`sys.setswitchinterval`): how long
the sampling thread may keep the GIL once the loop wants it. At Python's default, 5 ms, every
socket call and write of the loop (several a turn) waits that long behind a sampler that
computes: a remote-trial call took 14 ms at p50 under TPE, against 3 ms at 0.5 ms
(benchmarks/fleet.py --probe)."""

STOP_WAIT_S = 30.0
"""How long stopping waits for the ask in progress (a storage call that hangs is left behind:
the trial, RUNNING in the storage if it got that far, is the next broker's to send)."""


@dataclass(slots=True, eq=False)
class Sampled:
    """One ask's outcome: the trial and its sealed request, or what failed."""

    run: StudyRun
    trial: optuna.Trial | None  # None: the ask itself failed (`error`), no trial exists
    payload: bytes | None = field(default=None, repr=False)  # None: `error`
    error: BaseException | None = None  # raised by the ask, or by sealing `trial`
    ask_s: float = 0.0  # how long `study.ask()` took
    sample_s: float = 0.0  # how long the ask and the params (sealing) took


def sample(run: StudyRun, seal: Callable[[StudyRun, optuna.Trial], bytes]) -> Sampled:
    """Ask one trial of `run` and seal its request: on the sampling thread, or on the loop for
    a sampler fast enough (`Dispatcher`)."""
    started = time.perf_counter()
    try:
        trial = run.study.ask()
    except BaseException as exc:  # the loop raises it, as it would have asking itself
        took = time.perf_counter() - started
        return Sampled(run, None, error=exc, ask_s=took, sample_s=took)
    ask_s = time.perf_counter() - started
    failpoints.hit("after_ask")
    try:
        payload, error = seal(run, trial), None
    except BaseException as exc:
        payload, error = None, exc
    took = time.perf_counter() - started
    return Sampled(run, trial, payload, error=error, ask_s=ask_s, sample_s=took)


class SamplingThread:
    """Asks the trials the loop requests, on one thread started with the first request."""

    def __init__(
        self,
        *,
        seal: Callable[[StudyRun, optuna.Trial], bytes],
        wake: Callable[[], None],
    ) -> None:
        self._seal = seal
        self._wake = wake
        self._cond = threading.Condition()
        self._wanted: dict[int, tuple[StudyRun, int]] = {}  # id(run) -> (run, asks), in turn
        self._ready: deque[Sampled] = deque()
        self._busy: StudyRun | None = None  # the run an ask is in progress for
        self._discard: set[int] = set()  # id(run): the ask in progress for it is dropped
        self._waiting = False  # the loop blocks on the stream: wake it once one is ready
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- what the loop calls -------------------------------------------------------------------

    def request(self, run: StudyRun, n: int) -> None:
        """Ask `n` more trials of `run`."""
        with self._cond:
            _run, wanted = self._wanted.get(id(run), (run, 0))
            self._wanted[id(run)] = (run, wanted + n)
            if self._thread is None or not self._thread.is_alive():
                self._stopping = False
                self._thread = threading.Thread(
                    target=self._serve, name="optuna-rq-sampling", daemon=True
                )
                self._thread.start()
            self._cond.notify_all()

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    def take(self, run: StudyRun | None = None) -> Sampled | None:
        """The oldest ask done (of `run`, if given); None if there is none."""
        with self._cond:
            for sampled in self._ready:
                if run is None or sampled.run is run:
                    self._ready.remove(sampled)
                    return sampled
            return None

    def withdraw(self, run: StudyRun, *, discard: bool = False) -> int:
        """Ask no more trials of `run`; how many requested asks this drops (never started).
        The ask in progress for it is waited for, and then ready to `take`; with `discard`
        (a run whose storage failed) it is not waited for, and dropped, with the ready ones."""
        with self._cond:
            _run, dropped = self._wanted.pop(id(run), (run, 0))
            if discard:
                self._ready = deque(s for s in self._ready if s.run is not run)
                if self._busy is run:
                    self._discard.add(id(run))
            else:
                self._wait_idle(lambda: self._busy is not run)
            return dropped

    def stop(self) -> list[tuple[StudyRun, int]]:
        """Stop the thread once the ask in progress is done (`STOP_WAIT_S` at most); the asks
        requested and never started, per run. What was sampled stays ready to `take`."""
        with self._cond:
            dropped = list(self._wanted.values())
            self._wanted.clear()
            self._stopping = True
            self._cond.notify_all()
            if not self._wait_idle(lambda: self._busy is None):
                log.warning(
                    "an ask of study %r has not returned in %.0f s: left to go on; the trial is "
                    "the next broker's to send",
                    self._busy.study.study_name if self._busy else "?",
                    STOP_WAIT_S,
                )
            thread = self._thread
        if thread is not None and self._busy is None:
            thread.join(STOP_WAIT_S)
        return dropped

    def settle(self, timeout_s: float) -> None:
        """Wait until every ask requested is done, `timeout_s` at most."""
        with self._cond:
            deadline = time.monotonic() + timeout_s
            while self._wanted or self._busy is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return
                self._cond.wait(left)

    @contextmanager
    def blocking(self) -> Iterator[bool]:
        """Around a blocking read of the result stream: a trial sampled meanwhile wakes it.
        Yields False if one is ready already (then do not block)."""
        with self._cond:
            self._waiting = True
            ready = bool(self._ready)
        try:
            yield not ready
        finally:
            with self._cond:
                self._waiting = False

    # -- the thread ----------------------------------------------------------------------------

    def _wait_idle(self, idle: Callable[[], bool]) -> bool:
        deadline = time.monotonic() + STOP_WAIT_S
        while not idle():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._cond.wait(left)
        return True

    def _serve(self) -> None:
        while True:
            with self._cond:
                while not self._wanted and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                key, (run, wanted) = next(iter(self._wanted.items()))
                del self._wanted[key]
                if wanted > 1:  # to the back: one ask per study per pass
                    self._wanted[key] = (run, wanted - 1)
                self._busy = run
            sampled = sample(run, self._seal)
            with self._cond:
                self._busy = None
                if id(run) in self._discard:
                    self._discard.discard(id(run))
                else:
                    self._ready.append(sampled)
                wake, self._waiting = self._waiting, False
                self._cond.notify_all()
            if wake:
                try:
                    self._wake()
                except Exception as exc:  # Redis away: the loop finds out, and reads again
                    log.debug("could not wake the loop: %s", exc)
