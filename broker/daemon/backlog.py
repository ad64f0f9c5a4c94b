"""Pending work: bulk commands, applied a slice at a time across turns of the loop, and resumed
where they stopped after a restart.

A command that can carry more work than one turn may take (an `Enqueue` of 100,000 parameter
sets) is not applied when the inbox reads it. The inbox moves it, as it came (sealed), onto its
study's backlog in the same transaction that trims it off the inbox: it is always in exactly one
of the two. Each turn, `drain` spends at most `budget_s` on the backlogs, one study after
another (starting with a different one each turn): the command's kind (`BulkKind`) applies its
items from the study's cursor on, until the deadline; then the storages are flushed, and only
then the cursor advances in Redis (the command leaves the backlog with its last item). A broker
that dies between the flush and the cursor applies those items again, so a kind's items must be
idempotent, as every command is (a set already enqueued is skipped).

A study's backlog goes when the study does: `drop` (cancel, delete) or, at the next turn, when
it is no longer running (finished, failed). The log says how many items were dropped.

Each command done with, applied whole or dropped, leaves a receipt for its front door
(`protocol.receipts`), written in the transaction that takes it off the backlog: how many of its
items the kind found new, there already, or refused, and how many were dropped and why (the
kind counts them in the tally `apply` is given).

Keys (`Keys.backlog`, `Keys.backlog_of`):

    <prefix>:backlog            hash: study -> items of its first pending command applied
    <prefix>:backlog:<study>    list: its pending commands, oldest first, sealed as they came
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import Counter, deque
from collections.abc import Callable, Container, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import redis

from optuna_rq.dispatch import count_refusal
from optuna_rq.errors import ProtocolError
from optuna_rq.plumbing import failpoints
from optuna_rq.protocol import (
    RECEIPT_TTL_S,
    BulkReceipt,
    Command,
    Keys,
    Record,
    Signer,
    decode_command,
)

__all__ = ["TURN_BUDGET_S", "Backlog", "BulkKind"]

log = logging.getLogger("optuna_rq.broker")

TURN_BUDGET_S = 0.01
"""What one turn spends on pending work, at most (and one item more): what it adds to the wait
of every other study."""
PROGRESS_EVERY_S = 5.0
"""A long backlog logs its progress this often."""


class BulkKind(Protocol):
    """How one kind of bulk command is applied a slice at a time."""

    what: str  # its items, as the log names them: "parameter sets"

    def accepts(self, study: str) -> bool:
        """Whether the study can take the command's items now (it runs); else it was refused."""
        ...

    def items(self, command: Command) -> Sequence[Any]:
        """The command's items, in the order they are applied."""
        ...

    def apply(
        self, study: str, items: Sequence[Any], start: int, deadline: float, tally: Counter[str]
    ) -> int:
        """Apply `items[start:]` in order, stopping once `perf_counter()` passes `deadline`
        (after one item at least, unless it must first prepare); the position reached. Counts
        each item applied in `tally`, as `new`, `existing` or `refused` (its receipt's words)."""
        ...

    def hold(self, study: str) -> None:
        """The study still has items pending after this turn's slices (called before its
        refill): e.g. enqueued sets not yet stored keep sampled trials from running first."""
        ...

    def end(self, study: str) -> None:
        """The study has nothing pending any more: forget what `apply` kept for it."""
        ...


@dataclass(slots=True)
class _Pending:
    raw: bytes
    kind: BulkKind
    items: Sequence[Any]
    command: str  # its id: what its receipt is stored under
    done: int = 0
    earlier: int = 0  # items applied by a broker before this one (read back at its start)
    tally: Counter[str] = field(default_factory=Counter)  # how the items applied here went


@dataclass(slots=True)
class _Progress:
    total: int = 0  # items taken since the backlog was last empty (or since this broker began)
    applied: int = 0
    logged_at: float = field(default_factory=time.monotonic)
    kinds: list[BulkKind] = field(default_factory=list)  # to `end` when the backlog is

    def took(self, kind: BulkKind, items: int, done: int = 0) -> None:
        self.total += items
        self.applied += done
        if kind not in self.kinds:
            self.kinds.append(kind)


class Backlog:
    """The pending bulk commands of every study, mirrored in Redis."""

    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        *,
        signer: Signer,
        persist: Callable[[], None],
        kinds: Mapping[type[Any], BulkKind],
        budget_s: float = TURN_BUDGET_S,
    ) -> None:
        self.connection = connection
        self.keys = keys
        # What was verified when it was taken is verified again when read back after a restart,
        # but not refused for its age: it waited on the backlog, not in transit.
        self.signer = dataclasses.replace(signer, max_age_s=math.inf)
        self.persist = persist  # what a slice stored is durable before its cursor moves
        self.kinds = dict(kinds)
        self.budget_s = budget_s
        self._studies: dict[str, deque[_Pending]] = {}
        self._progress: dict[str, _Progress] = {}
        self._loaded = False
        self._turn = 0

    @property
    def pending(self) -> bool:
        """Whether any study has work pending: the loop must not wait on the stream."""
        return bool(self._studies)

    def left(self, study: str) -> int:
        """Items the study has pending."""
        return sum(len(p.items) - p.done for p in self._studies.get(study, ()))

    def holds(self, raw: bytes, study: str) -> bool:
        """Whether the command `raw` is pending on `study`'s backlog (as Redis holds it, after
        a restart or an outage)."""
        self._load()
        return any(pending.raw == raw for pending in self._studies.get(study, ()))

    def takes(self, command: Command) -> bool:
        """Whether `command` is a bulk command its study accepted: `take` it."""
        kind = self.kinds.get(type(command))
        return kind is not None and kind.accepts(command.study)

    # -- the inbox's side ----------------------------------------------------------------------

    def take(self, raw: bytes, command: Command, *, inbox_done: int) -> None:
        """Move `command` (`raw`, as read) onto its study's backlog, and trim the `inbox_done`
        commands up to it off the inbox, in one transaction."""
        self._load()
        kind = self.kinds[type(command)]
        study = command.study
        pipe = self.connection.pipeline(transaction=True)
        pipe.rpush(self.keys.backlog_of(study), raw)
        pipe.hsetnx(self.keys.backlog, study, 0)
        pipe.ltrim(self.keys.commands, inbox_done, -1)
        self._execute(pipe)
        items = kind.items(command)
        pending = _Pending(raw, kind, items, command.id)
        self._studies.setdefault(study, deque()).append(pending)
        self._progress.setdefault(study, _Progress()).took(kind, len(items))
        failpoints.hit("after_take")

    def refuse(self, command: Command, why: str) -> None:
        """A bulk command its study did not accept (`takes` was False): its receipt says that
        none of its items was applied, and why."""
        kind = self.kinds.get(type(command))
        if kind is None:
            return
        pending = _Pending(b"", kind, kind.items(command), command.id)
        pipe = self.connection.pipeline(transaction=True)
        self._write_receipt(pipe, command.study, pending, done=0, why=why)
        pipe.execute()

    def drop(self, study: str, why: str = "") -> None:
        """Forget the study's pending work, here and in Redis."""
        self._load()
        left = self.left(study)
        what = self._studies[study][0].kind.what if left else ""
        pipe = self.connection.pipeline(transaction=True)
        pipe.delete(self.keys.backlog_of(study))
        pipe.hdel(self.keys.backlog, study)
        for pending in self._studies.get(study, ()):
            why_dropped = why or "the study stopped"
            self._write_receipt(pipe, study, pending, done=pending.done, why=why_dropped)
        self._execute(pipe)
        self._end(study)
        if left:
            log.warning(
                "study %r: %d %s not applied, dropped%s", study, left, what, why and f": {why}"
            )

    # -- the loop's side -----------------------------------------------------------------------

    def drain(
        self,
        running: Container[str],
        guard: Callable[[str], AbstractContextManager[None]] = lambda study: nullcontext(),
    ) -> None:
        """Apply pending work for at most `budget_s`, each study's under its `guard` (its fault
        boundary); drop that of studies not `running`."""
        self._load()
        if not self._studies:
            return
        deadline = time.perf_counter() + self.budget_s
        studies = list(self._studies)
        self._turn += 1
        first = self._turn % len(studies)
        for study in studies[first:] + studies[:first]:
            if study not in running:
                self.drop(study, "the study is not running")
                continue
            with guard(study):
                while study in self._studies and time.perf_counter() < deadline:
                    if not self._slice(study, deadline):
                        break  # preparing (an index to read first): more on the next turn
                if study in self._studies:
                    self._studies[study][0].kind.hold(study)

    def _slice(self, study: str, deadline: float) -> bool:
        """Apply a slice of the study's first pending command; False if it made no progress."""
        pending = self._studies[study][0]
        reached = pending.kind.apply(study, pending.items, pending.done, deadline, pending.tally)
        if reached == pending.done:
            return False
        self.persist()
        failpoints.hit("after_slice")
        finished = reached >= len(pending.items)
        pipe = self.connection.pipeline(transaction=True)
        if finished:
            pipe.lpop(self.keys.backlog_of(study))
            self._write_receipt(pipe, study, pending, done=reached)
            if len(self._studies[study]) > 1:
                pipe.hset(self.keys.backlog, study, 0)
            else:
                pipe.hdel(self.keys.backlog, study)
        else:
            pipe.hset(self.keys.backlog, study, reached)
        self._execute(pipe)
        progress = self._progress.setdefault(study, _Progress())
        progress.applied += reached - pending.done
        pending.done = reached
        if finished:
            self._studies[study].popleft()
        now = time.monotonic()
        if study in self._studies and now - progress.logged_at >= PROGRESS_EVERY_S:
            progress.logged_at = now
            what = self._studies[study][0].kind.what
            log.info("study %r: %d of %d %s applied", study, progress.applied, progress.total, what)
        if not self._studies[study]:
            self._end(study)
        return True

    def _write_receipt(
        self,
        pipe: redis.client.Pipeline,
        study: str,
        pending: _Pending,
        *,
        done: int,
        why: str | None = None,
    ) -> None:
        """Queue on `pipe` the receipt of `pending`, done with: its first `done` items applied,
        the rest dropped (`why`)."""
        tally = pending.tally
        dropped = len(pending.items) - done
        receipt = BulkReceipt(
            study=study,
            command=pending.command,
            new=tally["new"],
            existing=tally["existing"],
            refused=tally["refused"],
            dropped=dropped,
            earlier=pending.earlier,
            why=why if dropped else None,
        )
        pipe.set(self.keys.receipt(pending.command), receipt.sealed(self.signer), ex=RECEIPT_TTL_S)

    def _execute(self, pipe: redis.client.Pipeline) -> None:
        try:
            pipe.execute()
        except redis.RedisError:
            # Whether it was applied is unknown (a reply lost with the connection): read the
            # backlogs again from Redis, which holds the truth, before the next use.
            self._studies.clear()
            self._progress.clear()
            self._loaded = False
            raise

    def _end(self, study: str) -> None:
        self._studies.pop(study, None)
        progress = self._progress.pop(study, None)
        for kind in progress.kinds if progress is not None else ():
            kind.end(study)

    def _load(self) -> None:
        """Read the backlogs a broker before this one left (once)."""
        if self._loaded:
            return
        self._loaded = True
        cursors: dict[bytes, bytes] = self.connection.hgetall(self.keys.backlog)  # type: ignore[assignment]
        for name, cursor in cursors.items():
            # Whoever can write to Redis can write here too: what is not a backlog this broker
            # could have left is refused (counted, logged), never fatal, and the rest resumes.
            try:
                study = name.decode()
            except UnicodeDecodeError:
                why = f"a backlog entry named {name!r} dropped: not a study's name"
                count_refusal(self.connection, self.keys.prefix, "backlog", why)
                self.connection.hdel(self.keys.backlog, name)
                continue
            try:
                done = int(cursor)
                if done < 0:
                    raise ValueError(cursor)
            except ValueError:  # applied again from its start: its items are idempotent
                why = f"study {study!r}: its backlog's cursor {cursor!r} is not a count"
                count_refusal(self.connection, self.keys.prefix, "backlog", why)
                done = 0
            key = self.keys.backlog_of(study)
            try:
                raws: list[bytes] = self.connection.lrange(key, 0, -1)  # type: ignore[assignment]
            except redis.ResponseError as exc:  # not a list (WRONGTYPE): nothing of ours
                why = f"study {study!r}: its backlog {key!r} dropped: {exc}"
                count_refusal(self.connection, self.keys.prefix, "backlog", why)
                raws = []
                self.connection.delete(key)
            for raw in raws:
                try:
                    command = decode_command(
                        self.signer.open(Record.COMMAND, raw),
                        max_bytes=self.signer.max_message_bytes,
                    )
                    kind = self.kinds[type(command)]
                    if command.study != study:  # copied here: its sets are another study's
                        raise ProtocolError(f"it is study {command.study!r}'s, not this one's")
                except (ProtocolError, KeyError) as exc:
                    why = f"study {study!r}: a pending command dropped: {exc}"
                    count_refusal(self.connection, self.keys.prefix, "backlog", why)
                    pipe = self.connection.pipeline(transaction=True)
                    pipe.lrem(key, 1, raw)  # type: ignore[arg-type]  # bytes are fine
                    if study not in self._studies:  # the cursor was this command's
                        pipe.hset(self.keys.backlog, study, 0)
                        done = 0
                    pipe.execute()
                    continue
                items = kind.items(command)
                done = min(done, len(items)) if study not in self._studies else 0
                pending = _Pending(raw, kind, items, command.id, done=done, earlier=done)
                self._studies.setdefault(study, deque()).append(pending)
                self._progress.setdefault(study, _Progress()).took(kind, len(items), done)
            if study in self._studies:
                what = self._studies[study][0].kind.what
                log.info("study %r: %d %s pending, to apply", study, self.left(study), what)
            else:
                self.connection.hdel(self.keys.backlog, study)
