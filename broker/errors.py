"""The error tree: every error optuna-rq raises on purpose derives from `OptunaRQError`.

Each class says what the command line exits with when it reaches it (`exit_code`): 2 for a
usage error (a bad input, fixable by changing the command), 1 for a runtime error.
"""

from __future__ import annotations

__all__ = [
    "BrokerAlreadyRunningError",
    "ConfigError",
    "FenceError",
    "FenceLostError",
    "JournalConflictError",
    "MessageLimitError",
    "ObjectiveLoadError",
    "ObjectiveRefusedError",
    "OptunaRQError",
    "ProtocolError",
    "RedisDataLostError",
    "RedisInUseError",
    "RedisUnavailableError",
    "RemoteTrialError",
    "StorageNotAllowedError",
    "StudyConflictError",
    "StudyEndedError",
    "StudyStorageError",
]


class OptunaRQError(Exception):
    """Base for every error optuna-rq raises on purpose."""

    exit_code: int = 1


class ConfigError(OptunaRQError, ValueError):
    """A bad argument or setting, caught before anything runs.

    It is also a `ValueError` because flytekitplugins.optuna raises `ValueError` for the same
    mistakes, and code written against it catches that.
    """

    exit_code = 2


class StorageNotAllowedError(ConfigError):
    """A study storage the broker's operator did not allow (`optuna_rq.storage.storage_policy`):
    nothing of it was opened."""


class ProtocolError(OptunaRQError):
    """A message that is not a valid optuna-rq message."""


class MessageLimitError(ProtocolError):
    """A message over a limit of the wire (`protocol.codec`: the byte cap, the entries of a list
    or map, the nesting depth). Whoever makes one refuses it, as the other side would."""


class RedisUnavailableError(OptunaRQError):
    """Redis cannot be reached or started."""


class RedisInUseError(OptunaRQError):
    """`redis stop` refused: a broker, workers or other clients use the embedded server."""


class RedisDataLostError(OptunaRQError):
    """Redis came back without the data the broker wrote (the epoch key is gone)."""


class BrokerAlreadyRunningError(OptunaRQError):
    """Another broker holds this prefix."""


class FenceLostError(BrokerAlreadyRunningError):
    """A write was refused: the broker's lock is another broker's now (this one was frozen or
    cut off past the lock's TTL). Nothing of it was written; the broker stops."""


class FenceError(OptunaRQError):
    """A command the broker's fenced client cannot make conditional on its lock (a script, or a
    blocking write): refused rather than sent unfenced."""


class ObjectiveRefusedError(OptunaRQError):
    """The objective is not one this worker serves; nothing was imported."""


class ObjectiveLoadError(OptunaRQError):
    """A served module could not be imported, or lacks the named function."""


class RemoteTrialError(OptunaRQError):
    """The broker refused a trial call, or did not answer it."""


class StudyStorageError(OptunaRQError):
    """A study storage could not be opened, read or written (a path that cannot be created, a
    server that is down or does not answer, a journal that does not parse). The broker fails
    the studies on that storage and serves the others; `url` names it (credentials redacted)."""

    def __init__(self, url: str, message: str) -> None:
        super().__init__(message)
        self.url = url


class JournalConflictError(OptunaRQError, OSError):
    """The broker's journal file changed under Optuna's lock while the broker held it (a writer
    that ignores the lock, or a truncation). Studies on it fail rather than mix two writers'
    trial ids (`optuna_rq.storage.journal_file`)."""


class StudyConflictError(OptunaRQError):
    """A command that conflicts with the study as it is: another definition under its name, or a
    cancel or change of a study that has ended. Nothing was changed."""


class StudyEndedError(StudyConflictError):
    """A `cancel` or `set` of a study that has ended (or, for `set`, that a stop condition is
    winding down): refused, nothing changed; resubmitting the study reopens it
    (`protocol.status.refuse_if_closed`). A usage error: the command, not the system, is at
    fault."""

    exit_code = 2
