"""Commands from the front doors to the broker: submit, cancel, set. Typed, signed, strict.

They wait in `<prefix>:commands` until the broker applies them (it need not be running yet), and
are idempotent, so one applied twice (a broker that died before trimming the list) does no harm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, TypeAlias

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, decode_map
from optuna_rq.protocol.schema import (
    Float,
    Int,
    Kind,
    Message,
    Nested,
    Text,
    WrongValue,
    version_field,
    wire,
)
from optuna_rq.protocol.spec import StudySpec

__all__ = ["Cancel", "Change", "Command", "Submit", "decode_command"]


class _Op(Kind):
    """The command's name: the one value its class takes."""

    def __init__(self, op: str) -> None:
        self.op = op

    def check(self, value: Any) -> str:
        if value != self.op:
            raise WrongValue(repr(self.op))
        return self.op


@dataclass(frozen=True, slots=True, kw_only=True)
class Submit(Message):
    """Run `spec`; resubmitting a study already running applies its budget, cap and priority."""

    op: str = wire(_Op("submit"), default="submit")
    spec: StudySpec = wire(Nested(lambda: StudySpec))
    v: int = version_field()

    @property
    def study(self) -> str:
        return self.spec.name


@dataclass(frozen=True, slots=True, kw_only=True)
class Cancel(Message):
    """No new trials for `study`; its queued trials are withdrawn, its running ones end FAIL."""

    op: str = wire(_Op("cancel"), default="cancel")
    study: str = wire(Text())
    v: int = version_field()


@dataclass(frozen=True, slots=True, kw_only=True)
class Change(Message):
    """`optuna-rq set`: new budget, cap or priority for `study` (None leaves one as it is)."""

    op: str = wire(_Op("set"), default="set")
    study: str = wire(Text())
    n_trials: int | None = wire(Int(minimum=1, optional=True), default=None)
    concurrency: int | None = wire(Int(minimum=1, optional=True), default=None)
    priority: float | None = wire(Float(minimum=0, optional=True), default=None)
    v: int = version_field()

    def changes(self) -> dict[str, Any]:
        """The settings this command changes, by StudySpec field name."""
        named: dict[str, Any] = {"n_trials": self.n_trials, "concurrency": self.concurrency}
        named["priority"] = self.priority
        return {name: value for name, value in named.items() if value is not None}


Command: TypeAlias = "Submit | Cancel | Change"
_BY_OP: dict[str, type[Submit] | type[Cancel] | type[Change]] = {
    "submit": Submit,
    "cancel": Cancel,
    "set": Change,
}


def decode_command(raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> Command:
    """The command in `raw` (opened from its signature already), or ProtocolError."""
    data = decode_map(raw, what="command", max_bytes=max_bytes)
    op = data.get("op")
    kind = _BY_OP.get(op) if isinstance(op, str) else None
    if kind is None:
        raise ProtocolError(f"command has unknown op {op!r}: one of {', '.join(_BY_OP)}")
    return kind.from_wire(data)
