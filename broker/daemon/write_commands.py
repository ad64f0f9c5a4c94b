"""Which Redis commands write, as the server says: the `write` flag (and categories) of
COMMAND INFO, asked once per command name and kept (`CommandTable`). The broker's fenced client
(`daemon.fence`) sends what writes through its fence script and reads straight through."""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import Any

import redis

from optuna_rq.errors import FenceError

__all__ = ["CommandKind", "CommandTable", "text", "words_of"]

_execute: Callable[..., Any] = redis.Redis.execute_command  # typed for mypy: redis-py's is not


class CommandKind(enum.Enum):
    """How the fenced client sends a command."""

    READ = "read"
    WRITE = "write"
    READ_GROUP = "read-group"  # XREADGROUP: a write that may block


class CommandTable:
    """Which commands write, as the server's COMMAND INFO says: asked once per command name."""

    def __init__(self) -> None:
        self._kinds: dict[str, CommandKind | FenceError] = {}
        self._containers: set[str] = set()  # commands with subcommands (XGROUP CREATE, ...)

    def kind(self, client: redis.Redis, args: Sequence[Any]) -> CommandKind:
        words = words_of(args)
        command = text(words[0]).lower()
        if command not in self._kinds:
            self._learn(client, command)
        name = command
        if command in self._containers and len(words) > 1:
            name = f"{command}|{text(words[1]).lower()}"
        kind = self._kinds.get(name) or self._kinds[command]
        if isinstance(kind, FenceError):
            raise kind
        return kind

    def _learn(self, client: redis.Redis, name: str) -> None:
        [entry] = _execute(client, "COMMAND INFO", name)
        if entry is None:  # unknown here: sent fenced, the script returns the server's error
            self._kinds[name] = CommandKind.WRITE
            return
        self._kinds[name] = _classify(name, entry)
        subcommands = entry[9] if len(entry) > 9 else []
        for sub in subcommands:
            self._kinds[text(sub[0]).lower()] = _classify(text(sub[0]).lower(), sub)
        if subcommands:
            self._containers.add(name)


def _classify(name: str, entry: Sequence[Any]) -> CommandKind | FenceError:
    flags = {text(flag) for flag in entry[2]}
    categories = {text(c) for c in entry[6]} if len(entry) > 6 else set()
    if "readonly" in flags:
        return CommandKind.READ
    if "@scripting" in categories and "movablekeys" in flags:  # EVAL, EVALSHA, FCALL
        return FenceError(f"{name.upper()}: a script cannot run inside the fence script")
    if "write" not in flags:
        return CommandKind.READ
    if name == "xreadgroup":
        return CommandKind.READ_GROUP
    if "noscript" in flags or "blocking" in flags:
        return FenceError(f"{name.upper()}: a blocking write cannot be fenced")
    return CommandKind.WRITE


def words_of(args: Sequence[Any]) -> list[Any]:
    """A command as sent: redis-py names some as two words in one ("XGROUP CREATE")."""
    head = args[0]
    return [*head.split(), *args[1:]] if isinstance(head, str) else list(args)


def text(word: Any) -> str:
    return word.decode(errors="replace") if isinstance(word, bytes | bytearray) else str(word)
