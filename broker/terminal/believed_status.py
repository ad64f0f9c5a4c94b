"""What a follower of a study believes of it: the last status the broker wrote, and what it
ignored since (a status the broker did not sign, an ended one of an earlier submission), each
reported once.
"""

from __future__ import annotations

from optuna_rq.client import BrokerClient, queued_status
from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol import StudyStatus

__all__ = ["Believed", "first_believed"]


def first_believed(client: BrokerClient, name: str, queued: StudyStatus | None) -> Believed:
    """What a follower starts from: the study's status; with signing on, the submission's
    `queued` snapshot when it follows its own (the broker's status comes once it took it), or
    the broker's spec of the study as queued when its status is refused (a running study's,
    rewritten). A refused status of a study the broker does not hold is an error."""
    if queued is not None and client.signer.enabled:
        return Believed(client, name, queued, seen=False)
    try:
        return Believed(client, name, client.require_status(name), seen=True)
    except ProtocolError:
        held = client.stored_spec(name) if client.signer.enabled else None
        if held is None:
            raise  # nothing but the refused status says there is such a study
        return Believed(client, name, queued_status(held), seen=True)


class Believed:
    """What a follower believes of a study: the last status the broker wrote (`first` until it
    reads one: the study's status, or the submission's `queued` snapshot), and what it ignored
    since, reported once each (`notes`)."""

    def __init__(self, client: BrokerClient, name: str, first: StudyStatus, *, seen: bool) -> None:
        self.client = client
        self.name = name
        self.last = first
        self.seen = seen  # a status was read: if none is stored any more, the study vanished
        # A driven study's run the follower started on: an ended status of an earlier run (its
        # Optimizer's signed word, kept and written back) is not the end of this one.
        self.driven_since = first.submitted_at if first.driven else None
        self._pending: list[str] = []
        self._said: set[str] = set()

    def read(self) -> StudyStatus:
        """The study's status now; the last one believed if what is stored is refused, or if
        there is none yet (a submission the broker has not taken). ConfigError if it vanished."""
        try:
            status = self.client.status(self.name)
        except ProtocolError as exc:
            self._say("refused", f"ignoring the status of study {self.name!r}: {exc}")
            return self.last
        if status is None:
            if self.seen:
                prefix = self.client.prefix
                raise ConfigError(f"study {self.name!r} vanished from prefix {prefix!r}")
            return self.last
        self.seen = True
        self.last = status
        return status

    def is_current(self, snap: StudyStatus) -> bool:
        """Whether ended `snap` is of the submission the broker holds (`is_current`); for a
        study a remote Optimizer runs, of its run the follower started on, or a later one."""
        if snap.driven:
            since = self.driven_since
            if since is None or (snap.submitted_at or 0.0) >= since:
                return True
        elif self.client.is_current(snap):
            return True
        self._say(
            "earlier",
            f"ignoring the status of study {self.name!r}: it says {snap.state.value}, but of "
            "another submission than the one the broker holds (an earlier run's, written back?)",
        )
        return False

    def notes(self) -> list[str]:
        pending, self._pending = self._pending, []
        return pending

    def _say(self, kind: str, note: str) -> None:
        if kind not in self._said:
            self._said.add(kind)
            self._pending.append(note + "; waiting for the broker's own")
