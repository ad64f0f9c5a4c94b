"""Receipts: what the broker did with a bulk command's items, for the front door that sent it.

A bulk command (an `Enqueue` of parameter sets) is applied a slice a turn, after the front door
sent it. When the broker is done with one, it stores a `BulkReceipt` under the command's id
(`Keys.receipt`), for `RECEIPT_TTL_S`: how many of its items were new, how many were there
already (a set already enqueued or run), and how many were not applied and why. So `optuna-rq
enqueue` can say what happened, not what it sent. With signing on, the broker seals a receipt
to the command's id: a receipt copied under another command does not open.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol.commands import COMMAND_ID_PATTERN
from optuna_rq.protocol.keys import Keys
from optuna_rq.protocol.schema import Int, Matching, Message, Text, version_field, wire
from optuna_rq.protocol.signing import Record, Signer

if TYPE_CHECKING:
    import redis

__all__ = ["RECEIPT_TTL_S", "BulkReceipt", "read_receipts"]

RECEIPT_TTL_S = 3600
"""How long a receipt waits for its front door to read it."""

_COUNT = Int(minimum=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class BulkReceipt(Message):
    """What became of the items of one bulk command (`command`, its id) for `study`. They add up
    to the command's items: `new` (applied: a set stored as a WAITING trial), `existing` (there
    already: a set enqueued or run before), `refused` (the storage refused them: the broker's
    log says why), `dropped` (never applied: the study ended, was cancelled or deleted first, or
    was not running; `why` says which) and `earlier` (applied by a broker that stopped before it
    was done with the command: how each went is not known)."""

    study: str = wire(Text())
    command: str = wire(Matching(COMMAND_ID_PATTERN, "a command id (32 lowercase hex digits)"))
    new: int = wire(_COUNT, default=0)
    existing: int = wire(_COUNT, default=0)
    refused: int = wire(_COUNT, default=0)
    dropped: int = wire(_COUNT, default=0)
    earlier: int = wire(_COUNT, default=0)
    why: str | None = wire(Text(optional=True), default=None)
    v: int = version_field()

    @property
    def items(self) -> int:
        return self.new + self.existing + self.refused + self.dropped + self.earlier

    def sealed(self, signer: Signer) -> bytes:
        """What the broker stores under `Keys.receipt(command)`: sealed to that command."""
        return signer.seal(Record.RECEIPT, self.encode(), bound_to=self.command)


def read_receipts(
    connection: redis.Redis, keys: Keys, signer: Signer, command_ids: list[str]
) -> dict[str, BulkReceipt]:
    """The receipts the broker stored for these commands so far, by command id; ProtocolError
    for one that does not open (with signing on: not the broker's, or not this command's)."""
    if not command_ids:
        return {}
    raws: list[Any] = connection.mget([keys.receipt(i) for i in command_ids])
    found: dict[str, BulkReceipt] = {}
    for command, raw in zip(command_ids, raws, strict=True):
        if raw is None:
            continue
        body = signer.open(Record.RECEIPT, bytes(raw), bound_to=command)
        receipt = BulkReceipt.decode(body, max_bytes=signer.max_message_bytes)
        if receipt.command != command:
            raise ProtocolError(f"the receipt stored for command {command} is {receipt.command}'s")
        found[command] = receipt
    return found
