"""What a pool's child process reports to its supervising parent, over a multiprocessing Pipe:
an attempt started or ended, a forked work horse exited, the child retires. The values cross the
pipe pickled, so they are defined at module level.
"""

from __future__ import annotations

import multiprocessing.connection
from dataclasses import dataclass

from optuna_rq.workers.running_attempt import Attempt

__all__ = ["ChildChannel", "ChildMessage", "Ended", "HorseExited", "Retiring", "Started"]


@dataclass(frozen=True)
class Started:
    """`attempt` started in the child, or in its work horse: renew its lease, watch its
    deadline."""

    attempt: Attempt


@dataclass(frozen=True)
class Ended:
    """The attempt of RQ job `job_id` ended, its result delivered: stop renewing its lease."""

    job_id: str


@dataclass(frozen=True)
class Retiring:
    """The child took its `--max-trials-per-child` (`trials`) and exits: replace it."""

    trials: int


@dataclass(frozen=True)
class HorseExited:
    """The child's forked work horse `pid` exited abnormally (`exitcode`, as multiprocessing
    gives it: negative for a signal); its worker reaped it and lives on."""

    pid: int
    exitcode: int


ChildMessage = Started | Ended | HorseExited | Retiring


class ChildChannel:
    """The child's end of the pipe to its supervising parent."""

    def __init__(self, writer: multiprocessing.connection.Connection) -> None:
        self._writer = writer

    def started(self, attempt: Attempt) -> None:
        self._writer.send(Started(attempt))

    def ended(self, attempt: Attempt) -> None:
        self._writer.send(Ended(attempt.job_id))

    def exited(self, pid: int, exitcode: int) -> None:
        """A forked work horse `pid` exited abnormally (its worker reaped it)."""
        self._writer.send(HorseExited(pid, exitcode))

    def retiring(self, trials: int) -> None:
        """This child took its last trial (`--max-trials-per-child`) and exits."""
        self._writer.send(Retiring(trials))
