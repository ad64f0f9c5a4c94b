"""The study lifecycle: which states a study moves through, and which moves the broker allows.

    (submitted) --> queued --> running --> finished
                       |          |------> cancelled
                       |          '------> failed
                       '--> cancelled / failed
    finished, cancelled, failed --(resubmitted: the same definition)--> running

Only the broker moves a study, and only it publishes statuses (a study it has not taken yet
shows as `queued` to the front doors: `BrokerClient.status`). An ended study is never
rewritten by a later command: a cancel or `set` is refused, and only a resubmission of the
same definition runs it on, to its new budget. `Lifecycle` keeps each study's state as the
broker last published it, and refuses every other move.
"""

from __future__ import annotations

from collections.abc import Mapping

from optuna_rq.errors import StudyConflictError
from optuna_rq.protocol import StudyState

__all__ = ["ALLOWED", "Lifecycle"]

_Q, _R, _F, _C, _X = (
    StudyState.QUEUED,
    StudyState.RUNNING,
    StudyState.FINISHED,
    StudyState.CANCELLED,
    StudyState.FAILED,
)

ALLOWED: Mapping[StudyState | None, frozenset[StudyState]] = {
    None: frozenset({_Q, _R, _C, _X}),  # a study the broker had not heard of
    _Q: frozenset({_R, _C, _X}),
    _R: frozenset({_R, _F, _C, _X}),  # running -> running: a new snapshot
    _F: frozenset({_R}),  # resubmitted, with a bigger budget or not (then it ends at once)
    _C: frozenset({_R}),
    _X: frozenset({_R}),
}
"""state -> the states a study may move to from it."""


class Lifecycle:
    """Each study's state, as the broker last published it."""

    def __init__(self) -> None:
        self._states: dict[str, StudyState] = {}

    def state(self, name: str) -> StudyState | None:
        return self._states.get(name)

    def learn(self, name: str, state: StudyState | None) -> None:
        """Take the state a study is in (read from its published status), unchecked."""
        if state is None:
            self._states.pop(name, None)
        else:
            self._states[name] = state

    def check(self, name: str, to: StudyState) -> None:
        """StudyConflictError unless study `name` may move to `to`."""
        current = self._states.get(name)
        if to not in ALLOWED[current]:
            raise StudyConflictError(
                f"study {name!r} is {current.value if current else 'unknown'}: "
                f"it cannot become {to.value}"
            )

    def move(self, name: str, to: StudyState) -> None:
        """Move study `name` to `to`, or raise StudyConflictError leaving it as it was."""
        self.check(name, to)
        self._states[name] = to
