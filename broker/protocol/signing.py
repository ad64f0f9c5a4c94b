"""Signed records: with signing on, write access to Redis is not enough to forge what is acted on.

Everything one side writes to Redis for another to act on is a `Record`: a command, a job (a
trial request), a result, a trial call and its reply, a pool's heartbeat, a study's status, the
spec the broker keeps, the trials it publishes. With signing on it travels sealed, in an
envelope that names the kind of record, the role that signed it, the name it is stored under
(a status is bound to its study), when it was signed, and a signature over all of that and the
body. A record that is unsigned, signed for another kind or name, signed by a role that may not
sign it, mis-signed or stale is refused with `ProtocolError`.

Two ways to sign, chosen by what each process is given:

- **A key per role** (`OPTUNA_RQ_KEY` or `OPTUNA_RQ_KEY_FILE`, from `optuna-rq keys`): Ed25519.
  Each role signs with its own private key and verifies with the others' public keys, so only
  the broker signs jobs, replies, status, specs and published trials, only workers sign results,
  calls and heartbeats, and only front doors sign commands (a remote `Optimizer`, which
  dispatches its own trials, may also sign jobs and replies: no more than its submit could make
  run; and the status of the study it runs, as a record of its own kind that no reader takes
  for the broker's).
- **One shared secret** (`OPTUNA_RQ_SECRET` or `OPTUNA_RQ_SECRET_FILE`): HMAC-SHA256. For small
  setups where every machine is trusted alike: whoever holds it can sign as any role.

Without either, records travel as they are.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from optuna_rq.errors import ConfigError, ProtocolError
from optuna_rq.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, decode_map, peek_map
from optuna_rq.protocol.keyring import KeyRing, Role

__all__ = [
    "ENV_KEY",
    "ENV_KEY_FILE",
    "ENV_MAX_MESSAGE_BYTES",
    "ENV_SECRET",
    "ENV_SECRET_FILE",
    "Record",
    "Signer",
]

ENV_SECRET = "OPTUNA_RQ_SECRET"
ENV_SECRET_FILE = "OPTUNA_RQ_SECRET_FILE"
ENV_KEY = "OPTUNA_RQ_KEY"
ENV_KEY_FILE = "OPTUNA_RQ_KEY_FILE"
ENV_MAX_MESSAGE_BYTES = "OPTUNA_RQ_MAX_MESSAGE_BYTES"
_DOMAIN = b"optuna-rq/2\0"  # so a signature made for us means nothing elsewhere
_TOKEN_DOMAIN = b"optuna-rq/attempt-token\0"
_ENVELOPE = {"r", "by", "ts", "body", "sig"}
_SHARED = "shared"  # the signer named in an envelope sealed with the shared secret
_MIN_SECRET_BYTES = 16


class Record(str, enum.Enum):
    """What a sealed record is: it is signed as such, and opened only as such."""

    COMMAND = "command"
    REQUEST = "trial request"
    RESULT = "trial result"
    CALL = "trial call"
    REPLY = "trial call reply"
    CANCEL = "cancel mark"
    HEARTBEAT = "pool heartbeat"
    STATUS = "study status"
    DRIVEN_STATUS = "driven study status"
    SPEC = "stored study spec"
    RECEIPT = "bulk command receipt"
    TRIAL = "published trial"
    DRIVEN_TRIAL = "driven published trial"

    @property
    def signed_by(self) -> frozenset[Role]:
        """The roles whose keys may sign this kind of record."""
        return _SIGNED_BY[self]

    @property
    def ages(self) -> bool:
        """Whether an old one is refused as a replay. A status, a kept spec, a receipt or a
        published trial is current until its writer replaces it, however old; the rest is acted
        on once, soon after it is sent."""
        return self not in (
            Record.STATUS,
            Record.DRIVEN_STATUS,
            Record.SPEC,
            Record.RECEIPT,
            Record.TRIAL,
            Record.DRIVEN_TRIAL,
        )


_SIGNED_BY: dict[Record, frozenset[Role]] = {
    Record.COMMAND: frozenset({Role.CLIENT}),
    Record.REQUEST: frozenset({Role.BROKER, Role.CLIENT}),
    Record.REPLY: frozenset({Role.BROKER, Role.CLIENT}),
    Record.CANCEL: frozenset({Role.BROKER, Role.CLIENT}),
    Record.RESULT: frozenset({Role.WORKER}),
    Record.CALL: frozenset({Role.WORKER}),
    Record.HEARTBEAT: frozenset({Role.WORKER}),
    Record.STATUS: frozenset({Role.BROKER}),
    # The status of a study a remote Optimizer runs (`Keys.driven`): its own, signed with the
    # front-door key it holds, on a hash of its own; never taken for the broker's.
    Record.DRIVEN_STATUS: frozenset({Role.CLIENT}),
    Record.SPEC: frozenset({Role.BROKER}),
    Record.RECEIPT: frozenset({Role.BROKER}),
    Record.TRIAL: frozenset({Role.BROKER}),
    # A trial of a study a remote Optimizer runs, published by it as the broker publishes its
    # own (`Keys.trials_of`): signed with its front-door key, never taken for the broker's.
    Record.DRIVEN_TRIAL: frozenset({Role.CLIENT}),
}


@dataclass(frozen=True)
class Signer:
    """Seals the records a process writes and opens the ones it reads: the signature (a no-op
    with signing off) and the size cap every record is checked against before it is decoded.

    `secret` signs with one shared secret, `keyring` with this process's role key; not both."""

    secret: bytes | None = field(default=None, repr=False)
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    max_age_s: float = 24 * 3600.0
    """Older records are refused as replays: long enough for a trial to wait in a queue."""
    max_skew_s: float = 300.0
    """Clock difference tolerated between machines for records from the future."""
    keyring: KeyRing | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.secret is not None and self.keyring is not None:
            raise ConfigError(
                f"both a shared secret ({ENV_SECRET}) and a role key ({ENV_KEY}) are set: "
                "use one (a role key where roles should not trust each other alike)"
            )
        if self.secret is not None and len(self.secret) < _MIN_SECRET_BYTES:
            raise ConfigError(
                f"{ENV_SECRET} is {len(self.secret)} bytes; use at least {_MIN_SECRET_BYTES} "
                "random bytes (e.g. `python -c 'import secrets; print(secrets.token_hex(32))'`)"
            )

    # -- made from configuration ---------------------------------------------------------------

    @classmethod
    def load(
        cls,
        role: Role | None,
        *,
        secret: str | bytes | None = None,
        secret_file: str | Path | None = None,
        key: str | None = None,
        key_file: str | Path | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> Signer:
        """The signer of a process in `role`, from a shared secret or a role key, each given
        as a value or as a file holding it (a mounted secret); ConfigError naming the input.
        `role` None: a process that only reads, which any role's key lets verify (every key
        holds every role's public key), so `status` works on the broker's machine too."""
        if secret is not None and secret_file is not None:
            raise ConfigError(f"{ENV_SECRET} and {ENV_SECRET_FILE} are both set: use one")
        if key is not None and key_file is not None:
            raise ConfigError(f"{ENV_KEY} and {ENV_KEY_FILE} are both set: use one")
        if secret_file is not None:
            secret = _read_secret_file(secret_file, what=ENV_SECRET_FILE)
        keyring = None
        if key_file is not None:
            text = _read_secret_file(key_file, what=ENV_KEY_FILE).decode(errors="replace")
            keyring = KeyRing.from_token(text, source=f"{ENV_KEY_FILE} ({key_file})")
        elif key:
            keyring = KeyRing.from_token(key, source=ENV_KEY)
        if keyring is not None and role is not None and keyring.role is not role:
            source = ENV_KEY if key else f"{ENV_KEY_FILE} ({key_file})"
            raise ConfigError(
                f"{source} holds the {keyring.role.value} key; this process signs as the "
                f"{role.value}: give it the {role.value} key of the set `optuna-rq keys` made"
            )
        if isinstance(secret, str):
            secret = secret.encode()
        return cls(secret or None, max_message_bytes=max_message_bytes, keyring=keyring)

    @classmethod
    def from_env(cls, role: Role, environ: Mapping[str, str] | None = None) -> Signer:
        """From OPTUNA_RQ_SECRET(_FILE) or OPTUNA_RQ_KEY(_FILE), and OPTUNA_RQ_MAX_MESSAGE_BYTES
        (default 1 MiB)."""
        env = os.environ if environ is None else environ
        cap = env.get(ENV_MAX_MESSAGE_BYTES, str(DEFAULT_MAX_MESSAGE_BYTES))
        try:
            max_bytes = int(cap)
        except ValueError:
            max_bytes = 0
        if max_bytes < 1024:
            raise ConfigError(f"{ENV_MAX_MESSAGE_BYTES}={cap!r}: use a whole number >= 1024")
        return cls.load(
            role,
            secret=env.get(ENV_SECRET) or None,
            secret_file=env.get(ENV_SECRET_FILE) or None,
            key=env.get(ENV_KEY) or None,
            key_file=env.get(ENV_KEY_FILE) or None,
            max_message_bytes=max_bytes,
        )

    @property
    def enabled(self) -> bool:
        return self.secret is not None or self.keyring is not None

    @property
    def role(self) -> Role | None:
        """The role this process signs as (None: with the shared secret, or unsigned)."""
        return None if self.keyring is None else self.keyring.role

    @property
    def key_token(self) -> str | None:
        """The role key as one line, to hand to a process this one starts."""
        return None if self.keyring is None else self.keyring.to_token()

    def attempt_token(self, job_id: str) -> str:
        """The token a job carries and its result and calls give back: derived from this
        process's signing key and the job's id, so only the dispatcher that issued the job
        makes it (again after a restart, with nothing stored), and a worker key can answer only
        a job it was given. Empty with signing off."""
        if self.keyring is not None:
            material = self.keyring.private_bytes()
        elif self.secret is not None:
            material = self.secret
        else:
            return ""
        mac = hmac.new(material, _TOKEN_DOMAIN + job_id.encode(), hashlib.sha256)
        return mac.hexdigest()[:32]

    # -- sealing and opening -------------------------------------------------------------------

    def seal(self, record: Record, body: bytes, *, bound_to: str = "") -> bytes:
        """`body` in a signed envelope for a `record` stored under `bound_to` (a study's name,
        for what is kept per study); `body` itself with signing off."""
        if not self.enabled:
            return body
        if self.keyring is not None:
            by = self.keyring.role.value
            if self.keyring.role not in record.signed_by:
                raise ConfigError(f"a {by} key cannot sign a {record.value}")
        else:
            by = _SHARED
        ts = time.time()
        signed = _signed_bytes(record, by, bound_to, ts, body)
        if self.keyring is not None:
            sig = self.keyring.sign(signed)
        else:
            assert self.secret is not None
            sig = hmac.new(self.secret, signed, hashlib.sha256).digest()
        envelope = {"r": record.value, "by": by, "ts": ts, "body": body, "sig": sig}
        packed: bytes = msgpack.packb(envelope, use_bin_type=True)
        return packed

    def open(self, record: Record, raw: bytes, *, bound_to: str = "") -> bytes:
        """The body of a sealed `record`, after checking its size, kind, name, signer,
        signature and age; `raw` itself with signing off."""
        if not self.enabled:
            return raw
        what = record.value if not bound_to else f"{record.value} of {bound_to!r}"
        data = decode_map(raw, what=f"signed {what}", max_bytes=self.max_message_bytes + 256)
        return self._opened(record, what, bound_to, data)

    def open_over_the_cap(self, record: Record, raw: bytes) -> bytes:
        """`open` for a sealed `record` over the size cap, to answer it with why it is
        refused: its envelope's fields are read one by one (`codec.peek_map`: the body as one
        bytes object, nothing decoded) and its seal checked as `open` checks it. The body is
        not to be decoded: only peeked at. `raw` itself with signing off."""
        if not self.enabled:
            return raw
        what = record.value
        data = peek_map(raw, _ENVELOPE, what=f"signed {what}", max_bin_len=len(raw))
        return self._opened(record, what, "", data)

    def _opened(self, record: Record, what: str, bound_to: str, data: dict[str, Any]) -> bytes:
        if set(data) != _ENVELOPE:
            raise ProtocolError(f"{what} is not signed (signing is on: every one must be)")
        kind, by, ts, body, sig = (data[k] for k in ("r", "by", "ts", "body", "sig"))
        if not (
            isinstance(kind, str)
            and isinstance(by, str)
            and isinstance(ts, float)
            and isinstance(body, bytes)
            and isinstance(sig, bytes)
        ):
            raise ProtocolError(f"{what} has a malformed signature envelope")
        if kind != record.value:
            raise ProtocolError(f"{what}: this is a signed {kind!r}, not a {record.value}")
        self._check_signature(record, what, by, _signed_bytes(record, by, bound_to, ts, body), sig)
        age = time.time() - ts
        if age < -self.max_skew_s or (record.ages and age > self.max_age_s):
            raise ProtocolError(f"{what} is stale: signed {age:.0f}s ago (replayed?)")
        return body

    def _check_signature(
        self, record: Record, what: str, by: str, signed: bytes, sig: bytes
    ) -> None:
        if self.keyring is None:
            assert self.secret is not None
            expected = hmac.new(self.secret, signed, hashlib.sha256).digest()
            if by != _SHARED or not hmac.compare_digest(sig, expected):
                raise ProtocolError(f"{what} has a bad signature (a forgery, or another secret)")
            return
        try:
            role = Role(by)
        except ValueError:
            raise ProtocolError(f"{what} names no role of ours as its signer ({by!r})") from None
        if role not in record.signed_by:
            allowed = " or ".join(sorted(r.value for r in record.signed_by))
            raise ProtocolError(
                f"{what} is signed by a {role.value} key; only a {allowed} key signs one"
            )
        if not self.keyring.verify(role, sig, signed):
            raise ProtocolError(f"{what} has a bad signature (a forgery, or another key set)")


def _signed_bytes(record: Record, by: str, bound_to: str, ts: float, body: bytes) -> bytes:
    head: bytes = msgpack.packb([record.value, by, bound_to, ts], use_bin_type=True)
    return _DOMAIN + head + body


def _read_secret_file(path: str | Path, *, what: str) -> bytes:
    """A mounted secret: its bytes less one trailing newline; ConfigError naming the file."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{what}: cannot read {str(path)!r}: {exc.strerror or exc}") from None
    return data[:-1] if data.endswith(b"\n") else data
