"""The command inbox: the signed commands BrokerClient queues at `Keys.commands`.

Each step the broker reads up to `BATCH` of them (in the pipeline that checks the epoch), opens
each one's seal, decodes it, and hands it to its `CommandHandler`. A command that fails its seal
or does not decode is refused and counted; one the handler rejects (an unknown study, a bad
change) is refused and logged; one that raises anything else fails its study alone (it runs under
the study's fault guard, `Site.COMMAND`). Then the batch is trimmed off the list.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Protocol

import redis

from optuna_rq.dispatch import count_refusal
from optuna_rq.dispatch.boundary import FaultBoundary, Site
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

__all__ = ["BATCH", "CommandHandler", "CommandInbox"]

log = logging.getLogger("optuna_rq.broker")

BATCH = 100  # commands read per step


class CommandHandler(Protocol):
    """What the commands do; it may raise ConfigError, StudyConflictError, KeyError, TypeError or
    ValueError to refuse one."""

    def on_submit(self, spec: StudySpec) -> None: ...

    def on_cancel(self, name: str) -> None: ...

    def on_change(self, name: str, changes: dict[str, Any]) -> None: ...

    def on_enqueue(self, name: str, param_sets: list[dict[str, Any]]) -> None: ...

    def on_delete(self, name: str, *, force: bool, purge: bool) -> None: ...


class CommandInbox:
    def __init__(
        self,
        connection: redis.Redis,
        keys: Keys,
        *,
        signer: Signer,
        handler: CommandHandler,
        boundary: FaultBoundary,
        persist: Callable[[], None] | None = None,
    ) -> None:
        self.boundary = boundary
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
            with self.boundary.guard(_study_of(command), Site.COMMAND):
                try:
                    self._dispatch(command)
                except (ConfigError, StudyConflictError, KeyError, TypeError, ValueError) as exc:
                    log.error("refused a command: %s", exc)
        # Commands are idempotent, so trimming after applying loses none if we die in between;
        # what they stored (an enqueued trial, a purge) is durable before they are trimmed.
        if self.persist is not None:
            self.persist()
        self.connection.ltrim(self.keys.commands, len(raw_commands), -1)

    def _dispatch(self, command: Command) -> None:
        match command:
            case Submit(spec=spec):
                self.handler.on_submit(spec)
            case Cancel(study=name):
                self.handler.on_cancel(name)
            case Change(study=name):
                self.handler.on_change(name, command.changes())
            case Enqueue(study=name, params=param_sets):
                self.handler.on_enqueue(name, param_sets)
            case Delete(study=name, force=force, purge=purge):
                self.handler.on_delete(name, force=force, purge=purge)


def _study_of(command: Command) -> str:
    """The study a command acts on."""
    return command.spec.name if isinstance(command, Submit) else command.study
