"""Signed messages: with a shared secret, write access to Redis is not enough to forge one.

With `OPTUNA_RQ_SECRET` set on the broker and the workers, every message travels in an envelope
carrying a timestamp and an HMAC-SHA256 over both; unsigned, mis-signed and stale messages are
refused with `ProtocolError`. Without a secret, messages travel as they are.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time
from dataclasses import dataclass, field

import msgpack

from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, decode_map

__all__ = ["ENV_SECRET", "Signer"]

ENV_SECRET = "OPTUNA_RQ_SECRET"
ENV_MAX_MESSAGE_BYTES = "OPTUNA_RQ_MAX_MESSAGE_BYTES"
_DOMAIN = b"optuna-rq/1\0"  # so a MAC made for us means nothing elsewhere
_ENVELOPE = {"ts", "body", "mac"}
_MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class Signer:
    """Seals outgoing messages and opens incoming ones: the signature (a no-op without a
    secret) and the size cap every message is checked against before it is decoded."""

    secret: bytes | None = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_age_s: float = 24 * 3600.0
    """Older messages are refused as replays: long enough for a trial to wait in a queue."""
    max_skew_s: float = 300.0
    """Clock difference tolerated between machines for messages from the future."""

    def __post_init__(self) -> None:
        if self.secret is not None and len(self.secret) < _MIN_SECRET_BYTES:
            raise ConfigError(
                f"{ENV_SECRET} is {len(self.secret)} bytes; use at least {_MIN_SECRET_BYTES} "
                "random bytes (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )

    @classmethod
    def from_env(cls) -> Signer:
        """From OPTUNA_RQ_SECRET and OPTUNA_RQ_MAX_MESSAGE_BYTES (default 1 MiB)."""
        value = os.environ.get(ENV_SECRET)
        cap = os.environ.get(ENV_MAX_MESSAGE_BYTES, str(DEFAULT_MAX_MESSAGE_BYTES))
        try:
            max_bytes = int(cap)
        except ValueError:
            max_bytes = 0
        if max_bytes < 1024:
            raise ConfigError(f"{ENV_MAX_MESSAGE_BYTES}={cap!r}: use a whole number >= 1024")
        return cls(value.encode() if value else None, max_message_bytes=max_bytes)

    @property
    def enabled(self) -> bool:
        return self.secret is not None

    def _mac(self, ts: float, body: bytes) -> bytes:
        assert self.secret is not None
        message = _DOMAIN + struct.pack(">d", ts) + body
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def seal(self, body: bytes) -> bytes:
        if self.secret is None:
            return body
        ts = time.time()
        envelope = {"ts": ts, "body": body, "mac": self._mac(ts, body)}
        packed: bytes = msgpack.packb(envelope, use_bin_type=True)
        return packed

    def open(self, raw: bytes, *, what: str) -> bytes:
        """The body of a sealed message, after checking its size, MAC and age."""
        if self.secret is None:
            return raw
        data = decode_map(raw, what=f"signed {what}", max_bytes=self.max_message_bytes + 64)
        if set(data) != _ENVELOPE:
            raise ProtocolError(f"{what} is not signed (a secret is set: every message must be)")
        ts, body, mac = data["ts"], data["body"], data["mac"]
        if not isinstance(ts, float) or not isinstance(body, bytes) or not isinstance(mac, bytes):
            raise ProtocolError(f"{what} has a malformed signature envelope")
        if not hmac.compare_digest(mac, self._mac(ts, body)):
            raise ProtocolError(f"{what} has a bad signature (a forgery, or another secret)")
        age = time.time() - ts
        if age > self.max_age_s or age < -self.max_skew_s:
            raise ProtocolError(f"{what} is stale: signed {age:.0f}s ago (replayed?)")
        return body
