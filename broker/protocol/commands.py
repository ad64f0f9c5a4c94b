"""Commands from the front doors to the broker: submit, cancel, set, enqueue, delete. Typed,
signed, strict.

They wait in `<prefix>:commands` until the broker applies them (it need not be running yet), and
are idempotent, so one applied twice (a broker that died before trimming the list) does no harm.
A bulk one (`Enqueue`) moves from the list onto its study's backlog in one step, and is applied
from there a slice at a time (`daemon.backlog`).

Each command carries an `id` of its own (random) and the time it was sent (`sent_at`), made when
the front door builds it. A signature proves who sent a command, not that it is the first time
it arrives: someone who can write to Redis can copy a signed `delete --purge` and push it again
after the study was resubmitted. So the broker applies each id once, and keeps the ids it applied
for as long as a command can be accepted at all (`daemon.ledger`).
"""

from __future__ import annotations

import re
import secrets
import time
from dataclasses import dataclass
from typing import Any, TypeAlias

from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CONTAINER_LEN,
    check_size,
    check_structure,
    decode_map,
    pack,
)
from optuna_rq.protocol.schema import (
    Bool,
    Float,
    Int,
    Kind,
    List,
    Matching,
    Message,
    Nested,
    Text,
    WrongValue,
    version_field,
    wire,
)
from optuna_rq.protocol.spec import KEEP_OUT, StudySpec
from optuna_rq.protocol.spec_bounds import check_settings

__all__ = [
    "COMMAND_ID_PATTERN",
    "Cancel",
    "Change",
    "Command",
    "Delete",
    "Enqueue",
    "Submit",
    "decode_command",
    "enqueue_commands",
    "sendable",
]


class _Op(Kind):
    """The command's name: the one value its class takes."""

    def __init__(self, op: str) -> None:
        self.op = op

    def check(self, value: Any) -> str:
        if value != self.op:
            raise WrongValue(repr(self.op))
        return self.op


COMMAND_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
"""A command's id: 16 random bytes in lowercase hex (no collision in any command's lifetime)."""


def _new_command_id() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True, slots=True, kw_only=True)
class _Sent(Message):
    """What every command carries besides its op: its id and when it was sent (epoch seconds),
    made when it is built, so that the broker applies it once (`daemon.ledger`)."""

    id: str = wire(
        Matching(COMMAND_ID_PATTERN, "a command id (32 lowercase hex digits)"),
        default_factory=_new_command_id,
    )
    sent_at: float = wire(Float(minimum=0), default_factory=time.time)


@dataclass(frozen=True, slots=True, kw_only=True)
class Submit(_Sent):
    """Run `spec`; resubmitting a study already running applies its budget, cap and priority."""

    op: str = wire(_Op("submit"), default="submit")
    spec: StudySpec = wire(Nested(lambda: StudySpec))
    v: int = version_field()

    @property
    def study(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(_Sent):
    """No new trials for `study`; its queued trials are withdrawn, its running ones end FAIL."""

    op: str = wire(_Op("cancel"), default="cancel")
    study: str = wire(Text())
    v: int = version_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Change(_Sent):
    """`optuna-rq set`: new budget, cap or priority for `study` (None leaves one as it is)."""

    op: str = wire(_Op("set"), default="set")
    study: str = wire(Text())
    n_trials: int | None = wire(Int(minimum=1, optional=True), default=None)
    concurrency: int | None = wire(Int(minimum=1, optional=True), default=None)
    priority: float | None = wire(Float(minimum=0, optional=True), default=None)
    v: int = version_field()

    def __post_init__(self) -> None:
        check_settings(n_trials=self.n_trials, concurrency=self.concurrency, priority=self.priority)

    def changes(self) -> dict[str, Any]:
        """The settings this command changes, by StudySpec field name."""
        named: dict[str, Any] = {"n_trials": self.n_trials, "concurrency": self.concurrency}
        named["priority"] = self.priority
        return {name: value for name, value in named.items() if value is not None}


class _ParamSets(List):
    """A list of parameter sets: str-keyed maps of values msgpack carries."""

    def check(self, value: Any) -> list[dict[str, Any]]:
        items = super().check(value)
        if not all(
            isinstance(item, dict) and all(isinstance(k, str) for k in item) for item in items
        ):
            raise WrongValue("a list of maps with str keys")
        return items


@dataclass(frozen=True, slots=True, kw_only=True)
class Enqueue(_Sent):
    """`optuna-rq enqueue`: run these parameter sets (dotted names -> values) before any sampled
    trial, each once. Stored in the study's storage as WAITING trials (Optuna's
    `enqueue_trial(skip_if_exists=True)`), a slice a turn, so they survive a broker restart and
    a set applied twice, or already run, is not run again. Large lists travel as several
    commands (`enqueue_commands`)."""

    op: str = wire(_Op("enqueue"), default="enqueue")
    study: str = wire(Text())
    params: list[dict[str, Any]] = wire(_ParamSets())
    v: int = version_field()


ENQUEUE_CHUNK = MAX_CONTAINER_LEN // 5
"""Parameter sets per `Enqueue` command at most: few enough that decoding one takes a small part
of the broker's turn, so results and leases are not kept waiting."""


def enqueue_commands(
    study: str, param_sets: list[dict[str, Any]], *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> list[Enqueue]:
    """`param_sets` as `Enqueue` commands, in order, each small enough to pass the broker's
    message cap (`max_bytes`, encoded), of `ENQUEUE_CHUNK` sets at most: 100,000 sets do not fit
    in one. Sent in one push, the broker takes them in one batch, and stores them in that order.
    ConfigError, naming it, for a set that does not fit in a command on its own."""
    room = max_bytes - 128 - len(study.encode())  # the command's own fields (its id and time
    # too), and its list
    commands: list[Enqueue] = []
    chunk: list[dict[str, Any]] = []
    size = 0
    for index, params in enumerate(param_sets):
        length = len(pack(params))
        if length > room:
            raise ConfigError(
                f"parameter set {index} is {length:,} bytes encoded: with its command it is over "
                f"the {max_bytes:,}-byte message cap; {_RAISE_CAP}"
            )
        if chunk and (size + length > room or len(chunk) >= ENQUEUE_CHUNK):
            commands.append(Enqueue(study=study, params=chunk))
            chunk, size = [], 0
        chunk.append(params)
        size += length
    if chunk:
        commands.append(Enqueue(study=study, params=chunk))
    return commands


@dataclass(frozen=True, slots=True, kw_only=True)
class Delete(_Sent):
    """`optuna-rq delete`: the broker forgets `study` (its spec and status); the study's trials
    stay in its storage unless `purge`. Refused while it runs unless `force`, which cancels it
    first."""

    op: str = wire(_Op("delete"), default="delete")
    study: str = wire(Text())
    force: bool = wire(Bool(), default=False)
    purge: bool = wire(Bool(), default=False)  # also delete the Optuna study in its storage
    v: int = version_field()


Command: TypeAlias = "Submit | Cancel | Change | Enqueue | Delete"
_BY_OP: dict[str, type[Submit] | type[Cancel] | type[Change] | type[Enqueue] | type[Delete]] = {
    "submit": Submit,
    "cancel": Cancel,
    "set": Change,
    "enqueue": Enqueue,
    "delete": Delete,
}


_RAISE_CAP = (
    "the cap can be raised, alike on the broker, the workers and here (--max-message-bytes, or "
    "OPTUNA_RQ_MAX_MESSAGE_BYTES)"
)


def sendable(command: Command, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> bytes:
    """`command` encoded, if the broker will take it: every limit of a message (`codec`) checked
    as the broker's decoder checks it, with the same cap. ConfigError naming the part, the
    limit it is over and the fix otherwise, so that a front door refuses what the broker would
    drop after the command was sent."""
    what = f"the {command.op} command"
    message = command.to_wire()
    keep_out = KEEP_OUT if isinstance(command, Submit) else "make it smaller"
    try:
        check_structure(message, what=what)
    except ProtocolError as exc:
        raise ConfigError(f"{exc}: {keep_out}") from None
    raw = pack(message)
    try:
        check_size(raw, what=what, max_bytes=max_bytes)
    except ProtocolError as exc:
        raise ConfigError(f"{exc}: {keep_out}, or {_RAISE_CAP}") from None
    return raw


def decode_command(raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Command:
    """The command in `raw` (opened from its signature already), or ProtocolError."""
    data = decode_map(raw, what="command", max_bytes=max_bytes)
    op = data.get("op")
    kind = _BY_OP.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(f"command has unknown op {op!r}: one of {', '.join(_BY_OP)}")
    return kind.from_wire(data)
