"""How a worker judges the broker's cancel marks.

The broker cancels a running attempt by setting its `Keys.cancel` mark; the supervising parent
reads it with each lease renewal (`workers.supervision`) and kills the attempt's process. A mark
is acted on only if it is the broker's (`CancelMarks`): with signing on, its value is sealed by
the dispatcher that issued the attempt (`Record.CANCEL`, bound to the attempt's job id), so a
Redis writer without the key cannot kill a trial by setting the key.
"""

from __future__ import annotations

import logging

import redis

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import Keys, Record, Signer
from optuna_rq.protocol.counters import count_refused
from optuna_rq.workers.running_attempt import Attempt

__all__ = ["CancelMarks"]

log = logging.getLogger("optuna_rq.pool")


class CancelMarks:
    """How a worker reads the cancel marks of one prefix's attempts: the one place a mark's value
    is judged. A mark holds if it is the broker's: with signing on, sealed as a cancel mark for
    the attempt's job id (`Record.CANCEL`); without signing, any value, as anyone may write one
    anyway. Any other value is not acted on: it is counted in `<prefix>:refused` as `cancel`
    (once per attempt and value: it stays there, read again at every renewal), and logged once
    per process."""

    _logged = False  # a refused mark was logged by this process

    def __init__(self, connection: redis.Redis, signer: Signer, keys: Keys) -> None:
        self.connection = connection
        self.signer = signer
        self.keys = keys
        self._counted: dict[str, bytes] = {}  # job id -> the refused value last counted

    def holds(self, attempt: Attempt, value: object) -> bool:
        """Whether `value`, read at `attempt.cancel_mark` (None: no mark), cancels it. A key
        Redis could not GET (a Redis writer made it a list) is a mark that is not the broker's:
        refused like a forged one, and the other attempts' renewals and marks go on."""
        if value is None:
            return False
        job_id = Keys.job_id(attempt.attempt_id)  # from the signed request, not from RQ
        try:
            if not isinstance(value, bytes):
                raise ProtocolError(f"the cancel mark of job {job_id!r} is not a string: {value}")
            self.signer.open(Record.CANCEL, value, bound_to=job_id)
        except ProtocolError as exc:
            seen = value if isinstance(value, bytes) else b"(not a string)"
            if self._counted.get(job_id) != seen:
                self._counted[job_id] = seen
                count_refused(self.connection, self.keys, "cancel")
            if not CancelMarks._logged:
                CancelMarks._logged = True
                log.warning(
                    "%s: not acting on its cancel mark, which is not the broker's (logged once; "
                    "counted in %s): %s",
                    attempt.describe(),
                    self.keys.refused,
                    exc,
                )
            return False
        return True

    def forget(self, attempt: Attempt) -> None:
        """`attempt` ended: nothing of its marks is kept."""
        self._counted.pop(Keys.job_id(attempt.attempt_id), None)
