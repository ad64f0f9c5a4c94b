"""The command inbox: the signed commands BrokerClient queues at `Keys.commands`.

Each step the broker reads up to `BATCH` of them (in the pipeline that checks the epoch), opens
each one's seal, decodes it, and hands it to its `CommandHandler`. A command that fails its seal
or does not decode is refused and counted; the others go to the handler, which applies each or
refuses it. Then the batch is trimmed off the list.

A bulk command (an `Enqueue`), once the handler accepts it, is not applied here: it moves onto
its study's backlog (`daemon.backlog`), in one transaction with the trim of the commands up to
it, and the loop applies it a slice a turn. Cancelling or deleting a study drops its backlog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Protocol

import redis

from optuna_rq.daemon.backlog import Backlog
from optuna_rq.dispatch import count_refusal
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import (
    Cancel,
    Command,
    Delete,
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
    """What the commands do (`daemon.commands.Commands`): it applies one, or refuses it and says
    why, and keeps whatever else goes wrong to the command's study."""

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
    ) -> None:
        self.connection = connection
        self.backlog = backlog
        self.persist = persist  # what the commands changed is durable before they are trimmed
        self.keys = keys
        self.signer = signer
        self.handler = handler

    def fetch(self, pipe: redis.client.Pipeline) -> None:
        """Queue the read of the next batch on `pipe`; hand its reply to `apply`."""
        pipe.lrange(self.keys.commands, 0, BATCH - 1)

    def apply(self, raw_commands: list[bytes]) -> None:
        """Apply the batch as read by `fetch`, in order, then trim it off the inbox. Once bulk
        commands took `TAKE_BUDGET_S` (decoding 2,000 sets takes ~6 ms), the rest of the batch
        waits for the next turn."""
        if not raw_commands:
            return
        started = time.perf_counter()
        trimmed = 0  # commands trimmed off the inbox already: with a bulk command, up to it
        read = 0  # commands applied (or refused)
        for raw in raw_commands:
            if trimmed and trimmed == read and time.perf_counter() - started >= TAKE_BUDGET_S:
                break
            read += 1
            try:
                body = self.signer.open(Record.COMMAND, raw)
                command = decode_command(body, max_bytes=self.signer.max_message_bytes)
            except ProtocolError as exc:
                log.error("refused a command: %s", exc)
                count_refusal(self.connection, self.keys.prefix, "command")
                continue
            self.handler.apply(command)
            backlog = self.backlog
            if backlog is None:
                continue
            if backlog.takes(command):  # accepted: its study runs
                self._persist()  # the commands trimmed with it are applied durably
                backlog.take(raw, command, inbox_done=read - trimmed)
                trimmed = read
            elif isinstance(command, (Cancel, Delete)):
                why = "cancelled" if isinstance(command, Cancel) else "deleted"
                backlog.drop(command.study, f"the study was {why}")
        # Commands are idempotent, so trimming after applying loses none if we die in between;
        # what they stored (a purge) is durable before they are trimmed.
        if trimmed < read:
            self._persist()
            self.connection.ltrim(self.keys.commands, read - trimmed, -1)

    def _persist(self) -> None:
        if self.persist is not None:
            self.persist()
