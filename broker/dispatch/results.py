"""The result stream: what workers append (results, and remote trials' calls), read through one
consumer group, and acknowledged only once recorded.

A result is acknowledged (XACK and XDEL) after it is recorded and the record is durable
(`before_ack`), in the same round trip as the sends that refill its slot (`ack_into`), or on its
own (`flush`) when nothing will be sent. A broker that dies in between reads it again, and
recording is idempotent. A consumer first reads its own
pending (delivered, unacknowledged) entries, then new ones.

The broker's loop also waits on its wake stream (`Keys.wake`), in the same XREADGROUP: an entry
there carries nothing but a front door's (or the sampler process's) wish that the loop turn now.
Its entries are acknowledged and deleted as soon as they are read, so the stream stays empty.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis
from optuna.trial import TrialState

from optuna_rq.dispatch.observer import DispatchObserver, count_dropped, count_refusal
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import (
    GROUP,
    AttemptId,
    FailReason,
    Keys,
    Outcome,
    Record,
    Signer,
    TrialResult,
)
from optuna_rq.study.verdict import Verdict

__all__ = ["ResultStream", "Tokened", "arrival_s", "issued", "unissued", "verdict_of"]

log = logging.getLogger("optuna_rq.dispatch")

_READ_COUNT = 256

Entry = tuple[bytes, dict[bytes, bytes]]
"""One stream entry: its id and fields."""


class ResultStream:
    """The dispatcher's end of the stream `reply_to`, as consumer `consumer` of its group; and
    of the wake stream `wake`, if it has one (the broker's), read with it."""

    def __init__(
        self,
        connection: redis.Redis,
        *,
        prefix: str,
        reply_to: str,
        consumer: str,
        signer: Signer,
        observer: DispatchObserver,
        before_ack: Callable[[], None],
        wake: str | None = None,
    ) -> None:
        self.connection = connection
        self.wake = wake
        self.before_ack = before_ack  # makes durable the records that the acks stand on
        self.prefix = prefix
        self.reply_to = reply_to
        self.consumer = consumer
        self.signer = signer
        self.observer = observer
        self.refused = 0  # results not valid (or not validly signed)
        self.dropped = 0  # results stale or repeated: acknowledged, counted, never recorded
        self._group_ready = False
        self._read_pending = True  # first read this consumer's unacknowledged results
        self._acks: list[bytes] = []  # entries handled, acknowledged with the next sends
        # Entries that asked nothing back (a `report`), acknowledged with the next read.
        self._read_acks: list[bytes] = []

    def ensure_group(self) -> None:
        if self._group_ready:
            return
        for stream in self._streams("0"):
            try:
                self.connection.xgroup_create(stream, GROUP, id="0", mkstream=True)
            except redis.ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise
        self._group_ready = True

    def _streams(self, entry_id: str) -> dict[Any, Any]:
        """The streams one read reads, each from `entry_id`."""
        return {self.reply_to: entry_id, **({self.wake: entry_id} if self.wake else {})}

    def after_outage(self) -> None:
        """Redis was unreachable: create the group again if need be, and read pending entries."""
        self._read_pending = True
        self._group_ready = False

    def read(self, block_s: float | None) -> list[Entry]:
        """The next entries, pending ones first (waiting up to `block_s` for new ones; None:
        not at all). The caller hands their ids to `handled` once it has dealt with them."""
        self.ensure_group()
        response: Any = None
        if self._read_pending:
            self.flush()  # recorded before an outage: not to be read (and dropped as stale) again
            # Results delivered to a broker that died before acknowledging them: tell them now.
            response = self.connection.xreadgroup(
                GROUP, self.consumer, self._streams("0"), count=_READ_COUNT
            )
            if not _entries_in(response):
                self._read_pending = False
                response = None
        read = response is not None
        if not read and self._read_acks:
            response = self._ack_and_read()
            read = block_s is None or _entries_in(response)  # else wait for one, acknowledged
        if not read:
            response = self.connection.xreadgroup(
                GROUP,
                self.consumer,
                self._streams(">"),
                count=_READ_COUNT,
                block=None if block_s is None else max(1, int(block_s * 1000)),
            )
        found: list[Entry] = []
        for stream, entries in response or ():
            if self.wake is not None and _name(stream) == self.wake:
                self._woken([entry_id for entry_id, _fields in entries])
            else:
                found += entries
        return found

    def _ack_and_read(self) -> Any:
        """Acknowledge the entries handled, and read the next ones without waiting, in one round
        trip: the calls that answer nothing (a `report`) are acknowledged here, and the trial's
        next call (its `should_prune`) is most often in the stream already."""
        self.with_next_write()
        self.before_ack()
        pipe = self.connection.pipeline(transaction=False)
        self.ack_into(pipe)
        pipe.xreadgroup(GROUP, self.consumer, self._streams(">"), count=_READ_COUNT)
        response = pipe.execute()[-1]
        self._acks = []
        return response

    def _woken(self, entry_ids: list[bytes]) -> None:
        """The loop was woken: acknowledge and delete the wake entries at once (they carry
        nothing, so nothing is lost if the broker dies before it acts on them)."""
        if entry_ids and self.wake is not None:
            pipe = self.connection.pipeline(transaction=False)
            pipe.xack(self.wake, GROUP, *entry_ids)
            pipe.xdel(self.wake, *entry_ids)
            pipe.execute()

    def handled(self, entry_ids: list[bytes], *, with_read: bool = False) -> None:
        """These entries were recorded (or dropped): acknowledge them with the next sends, or
        (`with_read`: calls that answer nothing) with the next read of the stream, which goes
        before the loop waits, or else with the next write (`with_next_write`)."""
        if with_read:
            self._read_acks += entry_ids
        else:
            self._acks += entry_ids

    def with_next_write(self) -> None:
        """The entries left for the next read are acknowledged with the next write instead."""
        self._acks += self._read_acks
        self._read_acks = []

    def ack_into(self, pipe: Any) -> None:
        """Queue the pending acknowledgements on `pipe`; `acked` once it has run. The caller
        runs `before_ack` before the pipe."""
        if self._acks:
            pipe.xack(self.reply_to, GROUP, *self._acks)
            pipe.xdel(self.reply_to, *self._acks)

    def acked(self) -> None:
        self._acks = []

    def flush(self) -> None:
        """Acknowledge the entries handled and not yet acknowledged, now."""
        self.with_next_write()
        if self._acks:
            self.before_ack()
            pipe = self.connection.pipeline(transaction=False)
            self.ack_into(pipe)
            pipe.execute()
            self._acks = []

    def open(self, raw: bytes) -> TrialResult | None:
        """The result in an entry's field; None if it is refused (not valid, not validly signed,
        or without its attempt's token: an attack or a bug, counted)."""
        try:
            body = self.signer.open(Record.RESULT, raw)
            result = TrialResult.decode(body, max_bytes=self.signer.max_message_bytes)
        except ProtocolError as exc:
            self._refuse("result", str(exc))
            return None
        if not issued(result, reply_to=self.reply_to, signer=self.signer):
            self._refuse("result token", unissued(result, "result"))
            return None
        return result

    def _refuse(self, kind: str, why: str) -> None:
        self.refused += 1
        self.observer.refused(kind)
        count_refusal(self.connection, self.prefix, kind, why)

    def drop(self, result: TrialResult) -> None:
        """`result` is stale (its attempt ended, or another broker owns it) or repeated: it is
        acknowledged with the rest, counted, and never recorded."""
        log.warning(
            "dropped a stale result: study %r trial %d attempt %d",
            *(result.study, result.trial_number, result.attempt),
        )
        self.dropped += 1
        self.observer.dropped()
        count_dropped(self.connection, self.prefix, "result")

    def close(self) -> None:
        """Remove the stream (for a private, per-run stream)."""
        self.connection.delete(self.reply_to)


class Tokened(Protocol):
    """What a worker's message names and proves: its attempt, and that attempt's token."""

    @property
    def study(self) -> str: ...
    @property
    def incarnation(self) -> str: ...
    @property
    def trial_number(self) -> int: ...
    @property
    def attempt(self) -> int: ...
    @property
    def token(self) -> str: ...


def issued(message: Tokened, *, reply_to: str, signer: Signer) -> bool:
    """Whether `message` carries the token of the attempt it names, as the dispatcher reading
    `reply_to` issued it (`TrialSender.seal`). A worker key signs results and calls for any
    attempt; only the worker given the job holds its token. With signing off both are empty."""
    attempt = AttemptId(
        reply_to=reply_to,
        study=message.study,
        incarnation=message.incarnation,
        trial_number=message.trial_number,
        attempt=message.attempt,
    )
    return hmac.compare_digest(message.token, signer.attempt_token(Keys.job_id(attempt)))


def unissued(message: Tokened, what: str) -> str:
    """Why `message` is refused, when it is not `issued`."""
    return (
        f"a {what} for study {message.study!r} trial {message.trial_number} (attempt "
        f"{message.attempt}) without the token of that attempt's job: validly signed, but not "
        "by the worker given the job (or for a job another key issued)"
    )


def _entries_in(response: Any) -> bool:
    """Whether an XREADGROUP `response` holds an entry."""
    return any(entries for _stream, entries in response or ())


def _name(stream: bytes | str) -> str:
    return stream.decode() if isinstance(stream, bytes) else stream


def arrival_s(entry_id: bytes) -> float:
    """When the entry was appended, epoch seconds: stream ids carry the XADD time in ms."""
    return int(entry_id.split(b"-")[0]) / 1000


def verdict_of(result: TrialResult) -> Verdict:
    """How the trial of `result` ends."""
    match result.outcome:
        case Outcome.COMPLETE:
            return Verdict(state=TrialState.COMPLETE, values=result.values)
        case Outcome.PRUNED:
            return Verdict(state=TrialState.PRUNED)
        case Outcome.FAIL:
            reason = result.fail_reason or FailReason.EXCEPTION
            return Verdict(state=TrialState.FAIL, fail_reason=reason, error=result.error)
    raise ProtocolError(f"unknown outcome {result.outcome!r}")
