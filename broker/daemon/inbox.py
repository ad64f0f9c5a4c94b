"""The command inbox: the signed commands BrokerClient queues at `Keys.commands`.

Each step the broker reads up to `BATCH` of them (in the pipeline that checks the epoch), opens
each one's seal, decodes it, and hands it to its `CommandHandler`. A command that fails its seal
or does not decode is refused and counted; the others go to the handler, which applies each or
refuses it. Then the batch is trimmed off the list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

import redis

from optuna_rq.dispatch import count_refusal
from optuna_rq.errors import ProtocolError
from optuna_rq.protocol import (
    Command,
    Keys,
    Signer,
    decode_command,
)

__all__ = ["BATCH", "CommandHandler", "CommandInbox"]

log = logging.getLogger("optuna_rq.broker")

BATCH = 100  # commands read per step


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
    ) -> None:
        self.connection = connection
        self.persist = persist  # what the commands changed is durable before they are trimmed
        self.keys = keys
        self.signer = signer
        self.handler = handler

    def fetch(self, pipe: redis.client.Pipeline) -> None:
        """Queue the read of the next batch on `pipe`; hand its reply to `apply`."""
        pipe.lrange(self.keys.commands, 0, BATCH - 1)

    def apply(self, raw_commands: list[bytes]) -> None:
        """Apply the batch as read by `fetch`, in order, then trim it off the inbox."""
        if not raw_commands:
            return
        for raw in raw_commands:
            try:
                body = self.signer.open(raw, what="command")
                command = decode_command(body, max_bytes=self.signer.max_message_bytes)
            except ProtocolError as exc:
                log.error("refused a command: %s", exc)
                count_refusal(self.connection, self.keys.prefix, "command")
                continue
            self.handler.apply(command)
        # Commands are idempotent, so trimming after applying loses none if we die in between;
        # what they stored (an enqueued trial, a purge) is durable before they are trimmed.
        if self.persist is not None:
            self.persist()
        self.connection.ltrim(self.keys.commands, len(raw_commands), -1)
