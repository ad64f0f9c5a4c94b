"""A key per role: the Ed25519 key a process signs with, and the public keys it verifies with.

There are three roles. The broker signs what it writes for others to act on (jobs, replies to
trial calls, study status, the specs it keeps); workers sign results, trial calls and their
heartbeats; front doors (the CLI, `BrokerClient`, a remote `Optimizer`) sign commands. Each
role holds its own private key and every role's public key, so it can check who signed what it
reads but can sign only as itself: a worker machine that is broken into can forge neither a
command nor a job.

A key travels as one line of text (an environment variable, a mounted secret file):

    optuna-rq-key-1:<role>:<private key>:<broker public key>:<worker public key>:<client public key>

each key 32 bytes in unpadded URL-safe base64. `optuna-rq keys` makes a set.
"""

from __future__ import annotations

import base64
import binascii
import enum
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
)

from optuna_rq.errors import ConfigError

__all__ = ["KEY_HEADER", "KeyRing", "Role", "generate_keyrings"]

KEY_HEADER = "optuna-rq-key-1"


class Role(str, enum.Enum):
    """Who a process is, as far as signatures go."""

    BROKER = "broker"
    WORKER = "worker"
    CLIENT = "client"  # a front door: the CLI, BrokerClient, a remote Optimizer


_ROLES = tuple(Role)


@dataclass(frozen=True)
class KeyRing:
    """One role's private key and every role's public key."""

    role: Role
    private: Ed25519PrivateKey = field(repr=False)
    public: dict[Role, Ed25519PublicKey] = field(repr=False)

    def sign(self, message: bytes) -> bytes:
        return self.private.sign(message)

    def verify(self, signer: Role, signature: bytes, message: bytes) -> bool:
        """Whether `signature` over `message` was made with `signer`'s private key."""
        try:
            self.public[signer].verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def private_bytes(self) -> bytes:
        """The private key's 32 bytes (secret material to derive other secrets from)."""
        return self.private.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())

    def to_token(self) -> str:
        """The one line this key is written as (it holds a private key: keep it secret)."""
        seed = self.private_bytes()
        publics = (self.public[r].public_bytes(Encoding.Raw, PublicFormat.Raw) for r in _ROLES)
        return ":".join([KEY_HEADER, self.role.value, _b64(seed), *map(_b64, publics)])

    @classmethod
    def from_token(cls, token: str, *, source: str) -> KeyRing:
        """The key a line holds; ConfigError naming `source` (where the line came from)."""
        parts = token.strip().split(":")
        if len(parts) != 6 or parts[0] != KEY_HEADER:
            raise ConfigError(
                f"{source} is not an optuna-rq key: expected one line "
                f"'{KEY_HEADER}:<role>:...' as `optuna-rq keys` writes it"
            )
        try:
            role = Role(parts[1])
        except ValueError:
            raise ConfigError(
                f"{source} names role {parts[1]!r}; one of {', '.join(r.value for r in Role)}"
            ) from None
        raw = [_unb64(part, source=source) for part in parts[2:]]
        private = Ed25519PrivateKey.from_private_bytes(raw[0])
        public = {
            r: Ed25519PublicKey.from_public_bytes(value)
            for r, value in zip(_ROLES, raw[1:], strict=True)
        }
        mine = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        if public[role].public_bytes(Encoding.Raw, PublicFormat.Raw) != mine:
            raise ConfigError(
                f"{source}: its private key is not the {role.value} key of its set "
                "(keys of two different sets mixed?)"
            )
        return cls(role, private, public)


def generate_keyrings() -> dict[Role, KeyRing]:
    """A fresh set: one key per role, each knowing every role's public key."""
    private = {role: Ed25519PrivateKey.generate() for role in Role}
    public = {role: key.public_key() for role, key in private.items()}
    return {role: KeyRing(role, private[role], dict(public)) for role in Role}


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str, *, source: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 32:
        raise ConfigError(f"{source} holds a damaged key (each part is 32 bytes in base64)")
    return raw
