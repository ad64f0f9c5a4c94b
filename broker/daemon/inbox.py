"""The command inbox: the signed commands BrokerClient queues at `Keys.commands`.

Each step the broker reads up to `BATCH` of them (in the pipeline that checks the epoch), opens
each one's seal, decodes it, and hands it to its `CommandHandler`. A command that fails its seal
or does not decode is refused and counted; the others go to the handler, which applies each or
refuses it. Then the batch is trimmed off the list.

A bulk command (an `Enqueue`), once the handler accepts it, is not applied here: it moves onto
its study's backlog (`daemon.backlog`), in one transaction with the trim of the commands up to
it, and the loop applies it a slice a turn. Cancelling or deleting a study drops its backlog.

Each command is applied once: the ledger (`daemon.ledger`) refuses one sent too long ago and one
whose id it took already (a replay), and is made durable before the commands it took are trimmed
off the inbox. A command the ledger holds in doubt (taken, then the broker stopped or lost Redis
before the trim) is not applied again, unless it is a bulk command that never reached its
backlog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import redis

from optuna_rq.daemon.backlog import Backlog
from optuna_rq.daemon.ledger import CommandLedger
from optuna_rq.dispatch import count_refusal
from optuna_rq.errors import ProtocolError
from optuna_rq.plumbing import failpoints
from optuna_rq.protocol import (
    Cancel,
    Command,
    Delete,
    Enqueue,
    Keys,
    Record,
    Signer,
    decode_command,
)

__all__ = ["BATCH", "TAKE_BUDGET_S", "CommandHandler", "CommandInbox"]

log = logging.getLogger("optuna_rq.broker")

BATCH = 100  # commands read per step
TAKE_BUDGET_S = 0.005
"""Time a turn spends taking bulk commands onto the backlog, after the first one."""


class CommandHandler(Protocol):
    """What the commands do (`daemon.command_handlers.Commands`): it applies one, or refuses it
    and says why, and keeps whatever else goes wrong to the command's study."""

    def apply(self, command: Command) -> None: ...


class CommandInbox:
    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        *,
        signer: Signer,
        handler: CommandHandler,
        persist: Callable[[], None] | None = None,
        backlog: Backlog | None = None,
        ledger: CommandLedger | None = None,
    ) -> None:
        self.connection = connection
        self.backlog = backlog
        self.persist = persist  # what the commands changed is durable before they are trimmed
        self.keys = keys
        self.signer = signer
        self.handler = handler
        # In memory only unless given one with a file (the daemon's is in its state directory).
        self.ledger = ledger or CommandLedger(
            None, window_s=signer.max_age_s, skew_s=signer.max_skew_s
        )
        self._ledger_failing = False

    def fetch(self, pipe: redis.client.Pipeline) -> None:
        """Queue the read of the next batch on `pipe`; hand its reply to `apply`."""
        pipe.lrange(self.keys.commands, 0, BATCH - 1)

    def apply(self, raw_commands: list[bytes]) -> None:
        """Apply the batch as read by `fetch`, in order, then trim it off the inbox. Once bulk
        commands took `TAKE_BUDGET_S` (decoding many sets is slow), the rest of the batch
        waits for the next turn."""
        if not raw_commands:
            return
        started = time.perf_counter()
        trimmed = 0  # commands trimmed off the inbox already: with a bulk command, up to it
        read = 0  # commands applied (or refused)
        ledger = self.ledger
        for raw in raw_commands:
            if trimmed and trimmed == read and time.perf_counter() - started >= TAKE_BUDGET_S:
                break
            read += 1
            try:
                body = self.signer.open(Record.COMMAND, raw)
                command = decode_command(body, max_bytes=self.signer.max_message_bytes)
            except ProtocolError as exc:
                count_refusal(self.connection, self.keys.prefix, "command", str(exc))
                continue
            admission = ledger.judge(command)
            if admission.refused:
                count_refusal(self.connection, self.keys.prefix, admission.refused, admission.why)
                continue
            if admission.in_doubt and not self._never_taken(raw, command):
                log.info("%s command %s was applied already: trimmed now", command.op, command.id)
                continue
            self.handler.apply(command)
            backlog = self.backlog
            if backlog is not None and backlog.takes(command):  # accepted: its study runs
                ledger.take(command, bulk=True)
                if not self._persist():  # the commands trimmed with it are applied durably
                    return
                backlog.take(raw, command, inbox_done=read - trimmed)
                ledger.trimmed()
                trimmed = read
                continue
            ledger.take(command)
            if backlog is not None and isinstance(command, Enqueue):  # refused: not running
                backlog.refuse(command, f"study {command.study!r} is not running")
            if backlog is not None and isinstance(command, (Cancel, Delete)):
                why = "cancelled" if isinstance(command, Cancel) else "deleted"
                backlog.drop(command.study, f"the study was {why}")
        # Commands are idempotent, so trimming after applying loses none if we die in between;
        # what they stored (a purge), and their ids, are durable before they are trimmed.
        if trimmed < read and self._persist():
            self.connection.ltrim(self.keys.commands, read - trimmed, -1)
            ledger.trimmed()

    def _never_taken(self, raw: bytes, command: Command) -> bool:
        """Whether a bulk command in doubt never reached its backlog: it is applied now."""
        if self.backlog is None or not self.ledger.bulk_in_doubt(command):
            return False
        return not self.backlog.holds(raw, command.study)

    def _persist(self) -> bool:
        """Make what the commands changed durable, then their ids; False (logged) if the ledger
        cannot be written: the commands are not trimmed, and wait in doubt until it can."""
        if self.persist is not None:
            self.persist()
        try:
            self.ledger.flush()
        except OSError as exc:
            if not self._ledger_failing:
                log.error(
                    "cannot write the ledger of applied commands (%s): commands wait in the "
                    "inbox until it can be written",
                    exc,
                )
            self._ledger_failing = True
            return False
        if self._ledger_failing:
            log.info("the ledger of applied commands is written again")
        self._ledger_failing = False
        failpoints.hit("after_ledger")
        return True
