"""What the dispatcher reports as trials move: hooks for an in-process observer (the metrics),
and the counters in Redis that anyone outside can read (`<prefix>:refused`, `<prefix>:dropped`).
"""

from __future__ import annotations

import redis

from optuna_rq.protocol import FailReason, Keys

__all__ = ["DispatchObserver", "count_dropped", "count_refusal"]


class DispatchObserver:
    """Hooks the dispatcher calls as trials move; the base does nothing (metrics override it)."""

    def asked(self, study: str, ask_s: float) -> None:
        pass

    def told(
        self,
        study: str,
        state: str,
        reason: FailReason | None,
        *,
        tell_s: float,
        start_delay_s: float | None,
        result_age_s: float | None,
    ) -> None:
        pass

    def dropped(self) -> None:
        pass

    def refused(self, kind: str) -> None:
        pass


def count_refusal(connection: redis.Redis, prefix: str, kind: str) -> None:
    """Count a refused message in `<prefix>:refused`, by kind: it is an attack or a bug."""
    connection.hincrby(Keys(prefix).refused, kind, 1)


def count_dropped(connection: redis.Redis, prefix: str, kind: str) -> None:
    """Count a dropped (stale or repeated) message in `<prefix>:dropped`, by kind: rare, and
    worth seeing from outside (a worker that came back)."""
    connection.hincrby(Keys(prefix).dropped, kind, 1)
