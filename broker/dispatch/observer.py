"""What the dispatcher reports as trials move: hooks for an in-process observer (the metrics),
and the counters in Redis that anyone outside can read (`<prefix>:refused`, `<prefix>:dropped`).

A refusal is an attack or a bug, and either may come as a flood (a forger pushing junk in a
loop): each is counted, but the log says the first of each kind, with its reason, and then at
most one line a minute for that kind (`RefusalLog`), so the flood stays in the counter.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis

from optuna_rq.protocol import FailReason, Keys, counters

__all__ = ["DispatchObserver", "RefusalLog", "count_dropped", "count_refusal", "refusal_log"]

log = logging.getLogger("optuna_rq.refused")

SUMMARY_EVERY_S = 60.0
"""After the first refusal of a kind, the log says at most this often how many more came."""


class DispatchObserver:
    """Hooks the dispatcher calls as trials move; the base does nothing (metrics override it)."""

    def asked(self, study: str, ask_s: float) -> None:
        pass

    def ended(
        self,
        study: str,
        state: str,
        reason: FailReason | None,
        *,
        tell_s: float | None = None,
        count: int = 1,
    ) -> None:
        """`count` trials of `study` ended in `state` (a `TrialState` name; FAIL with `reason`),
        told by the dispatcher: every way a trial ends comes here once (a worker's result, a
        lost worker, a cancel, a wind-down, a trial left RUNNING by a fault). `tell_s`: how
        long the tell took, if it was one tell."""

    def delivered(self, *, start_delay_s: float | None, result_age_s: float | None) -> None:
        """A worker's result was recorded: from its enqueue to its objective starting, and from
        the result's arrival to its tell (None: not known)."""

    def dropped(self) -> None:
        pass

    def refused(self, kind: str) -> None:
        pass


@dataclass
class _Kind:
    logged_at: float  # monotonic: when the log last reported something of this kind
    held: int = 0  # refusals since then, not logged yet
    since: float = 0.0  # wall clock: the first of them
    last_why: str = ""


class RefusalLog:
    """Logs refusals: the first of each kind at ERROR with its reason; after it, at most one
    line per kind every `every_s` ("N more refused <kind>s since ...", with the last reason).
    Thread-safe: a remote Optimizer's dispatcher runs in a thread of its own."""

    def __init__(
        self,
        logger: logging.Logger = log,
        *,
        every_s: float = SUMMARY_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.every_s = every_s
        self.clock = clock
        self._kinds: dict[str, _Kind] = {}
        self._lock = threading.Lock()

    def refused(self, kind: str, why: str) -> None:
        with self._lock:
            now = self.clock()
            seen = self._kinds.get(kind)
            if seen is None:
                self._kinds[kind] = _Kind(logged_at=now)
                self.logger.error("refused a %s: %s", kind, why)
                return
            if not seen.held:
                seen.since = time.time()
            seen.held += 1
            seen.last_why = why
            if now - seen.logged_at < self.every_s:
                return
            held, since, seen.held, seen.logged_at = seen.held, seen.since, 0, now
        self.logger.error(
            "%d more refused %ss since %s (the last: %s)",
            held,
            kind,
            time.strftime("%H:%M:%S", time.localtime(since)),
            seen.last_why,
        )


refusal_log = RefusalLog()
"""The process's: what `count_refusal` logs through."""


def count_refusal(connection: redis.Redis, prefix: str, kind: str, why: str = "") -> None:
    """Count a refused message in `<prefix>:refused`, by kind: it is an attack or a bug. With
    `why`, log it too, once per kind and then at most once a minute (`RefusalLog`)."""
    if why:
        refusal_log.refused(kind, why)
    counters.count_refused(connection, Keys(prefix), kind)


def count_dropped(connection: redis.Redis, prefix: str, kind: str) -> None:
    """Count a dropped (stale or repeated) message in `<prefix>:dropped`, by kind: rare, and
    worth seeing from outside (a worker that came back)."""
    counters.count_dropped(connection, Keys(prefix), kind)
