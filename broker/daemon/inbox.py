"""The command inbox: the signed commands BrokerClient queues at `Keys.commands`.

Each step the broker reads up to `BATCH` of them (in the pipeline that checks the epoch), opens
each one's seal, decodes it, and hands it to its `CommandHandler`. A command that fails its seal
or does not decode is refused and counted; one the handler rejects (an unknown study, a bad
change) is refused and logged. Then the batch is trimmed off the list.

A bulk command (an `Enqueue`), once the handler accepts it, is not applied here: it moves onto
its study's backlog (`daemon.backlog`), in one transaction with the trim of the commands up to
it, and the loop applies it a slice a turn. Cancelling or deleting a study drops its backlog.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

import redis

from optuna_rq.daemon.backlog import Backlog
from optuna_rq.dispatch import count_refusal
from optuna_rq.errors import ConfigError, ProtocolError, StudyConflictError
from optuna_rq.protocol import (
    Cancel,
    Change,
    Command,
    Delete,
    Enqueue,
    Keys,
    Signer,
    StudySpec,
    Submit,
    decode_command,
)

__all__ = ["BATCH", "TAKE_BUDGET_S", "CommandHandler", "CommandInbox"]

log = logging.getLogger("optuna_rq.broker")

BATCH = 100  # commands read per step
TAKE_BUDGET_S = 0.005
"""Time a turn spends taking bulk commands onto the backlog, after the first one."""


class CommandHandler(Protocol):
    """What the commands do; it may raise ConfigError, StudyConflictError, KeyError, TypeError or
    ValueError to refuse one."""

    def on_submit(self, spec: StudySpec) -> None: ...

    def on_cancel(self, name: str) -> None: ...

    def on_change(self, name: str, changes: dict[str, Any]) -> None: ...

    def on_enqueue(self, name: str, param_sets: list[dict[str, Any]]) -> None:
        """Accept the sets (or refuse them); the backlog stores them."""
        ...

    def on_delete(self, name: str, *, force: bool, purge: bool) -> None: ...


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
                body = self.signer.open(raw, what="command")
                command = decode_command(body, max_bytes=self.signer.max_message_bytes)
                self._dispatch(command)
                if self.backlog is not None and self.backlog.takes(command):
                    self._persist()  # the commands trimmed with it are applied durably
                    self.backlog.take(raw, command, inbox_done=read - trimmed)
                    trimmed = read
            except ProtocolError as exc:
                log.error("refused a command: %s", exc)
                count_refusal(self.connection, self.keys.prefix, "command")
            except (ConfigError, StudyConflictError, KeyError, TypeError, ValueError) as exc:
                log.error("refused a command: %s", exc)
        # Commands are idempotent, so trimming after applying loses none if we die in between;
        # what they stored (a purge) is durable before they are trimmed.
        if trimmed < read:
            self._persist()
            self.connection.ltrim(self.keys.commands, read - trimmed, -1)

    def _persist(self) -> None:
        if self.persist is not None:
            self.persist()

    def _dispatch(self, command: Command) -> None:
        match command:
            case Submit(spec=spec):
                self.handler.on_submit(spec)
            case Cancel(study=name):
                self.handler.on_cancel(name)
                self._drop_backlog(name, "the study was cancelled")
            case Change(study=name):
                self.handler.on_change(name, command.changes())
            case Enqueue(study=name, params=param_sets):
                self.handler.on_enqueue(name, param_sets)
            case Delete(study=name, force=force, purge=purge):
                self.handler.on_delete(name, force=force, purge=purge)
                self._drop_backlog(name, "the study was deleted")

    def _drop_backlog(self, study: str, why: str) -> None:
        if self.backlog is not None:
            self.backlog.drop(study, why)
