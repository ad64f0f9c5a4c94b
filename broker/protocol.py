"""The wire format: versioned msgpack messages, decoded strictly.

Every message is a msgpack map of field name to value, with a protocol version `v`. Decoding
checks the size before unpacking, refuses ext types and non-str keys, bounds nesting depth and
container lengths, and refuses unknown, missing or mistyped fields; every failure is one
`ProtocolError` that names what was wrong. Nothing here can run code: there is no pickle, and
no hook that builds objects from the data.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any, TypeAlias, TypeVar

import msgpack

from optuna_rq.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CONTAINER_LEN",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "RESULT_FIELD",
    "FailReason",
    "Outcome",
    "Param",
    "ProtocolError",
    "TrialCall",
    "TrialCallReply",
    "TrialRequest",
    "TrialResult",
    "check_params",
    "decode_map",
    "lease_key",
    "reply_key",
]

PROTOCOL_VERSION = 2
"""2: the package is `optuna_rq` (the job function moved to `optuna_rq.workers.runner`)."""
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DEPTH = 32
"""Nesting depth of maps and arrays in a message (the message itself is depth 1)."""
MAX_CONTAINER_LEN = 10_000
"""Entries in any one map or array."""
RESULT_FIELD = b"m"
"""The result-stream entry field that holds an encoded `TrialResult`."""

Param: TypeAlias = "None | bool | int | float | str | bytes | list[Param] | dict[str, Param]"


class Outcome(str, enum.Enum):
    COMPLETE = "COMPLETE"
    PRUNED = "PRUNED"
    FAIL = "FAIL"


class FailReason(str, enum.Enum):
    EXCEPTION = "exception"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"
    IMPORT_ERROR = "import_error"
    BAD_RETURN = "bad_return"
    CANCELLED = "cancelled"
    NOT_ALLOWED = "not_allowed"


# -- encoding ------------------------------------------------------------------------------------

_SCALARS = (type(None), bool, int, float, str, bytes)
_CARRIES = "use a list, str, int, float, bool, None or a dict of them"


def check_params(params: Mapping[str, object], root: str = "") -> None:
    """Refuse, naming its dotted path, any value msgpack cannot carry to a worker.

    Tuples pass (they arrive as lists); sets, objects, arrays and non-str keys do not.
    """
    _check_value(params, root, depth=1)


def _check_value(value: object, path: str, depth: int) -> None:
    where = f"input {path!r}" if path else "the inputs"
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{where} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, _SCALARS):
        if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**64:
            raise ProtocolError(f"{where} is {value}, too large an integer for msgpack")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_value(item, f"{path}[{index}]", depth + 1)
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ProtocolError(
                    f"{where} has the key {key!r} ({type(key).__name__}): keys must be str"
                )
            _check_value(item, f"{path}.{key}" if path else key, depth + 1)
        return
    raise ProtocolError(
        f"{where} is a {type(value).__name__}, which cannot be sent to workers: {_CARRIES}"
    )


def _pack(message: Mapping[str, object]) -> bytes:
    packed: bytes = msgpack.packb(message, use_bin_type=True)
    return packed


# -- decoding ------------------------------------------------------------------------------------


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack ext type {code} is not allowed")


def decode_map(
    raw: bytes, *, what: str, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> dict[str, Any]:
    """Unpack `raw` into a str-keyed map under every bound, or raise ProtocolError."""
    if not isinstance(raw, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"{what} must be bytes, got {type(raw).__name__}")
    size = len(raw)
    if size > max_bytes:
        raise ProtocolError(
            f"{what} is {size} bytes, over the {max_bytes}-byte cap (raise it with max_bytes)"
        )
    try:
        value = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            use_list=True,
            ext_hook=_refuse_ext,
            max_str_len=max_bytes,
            max_bin_len=max_bytes,
            max_array_len=MAX_CONTAINER_LEN,
            max_map_len=MAX_CONTAINER_LEN,
        )
    except ProtocolError:
        raise
    except msgpack.ExtraData as exc:
        raise ProtocolError(f"{what} has {len(exc.extra)} bytes after the message") from exc
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        # msgpack's format, size and key errors are ValueErrors; a truncated buffer too.
        raise ProtocolError(f"{what} is not valid msgpack ({size} bytes): {exc}") from exc
    if not isinstance(value, dict):
        raise ProtocolError(f"{what} must be a msgpack map, got {type(value).__name__}")
    _check_decoded(value, what, depth=1)
    return value


def _check_decoded(value: object, path: str, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ProtocolError(f"{path} nests deeper than {MAX_DEPTH} levels")
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):  # strict_map_key still lets bytes keys through
                raise ProtocolError(
                    f"{path} has a {type(key).__name__} key {key!r}: keys must be str"
                )
            _check_decoded(item, f"{path}.{key}", depth + 1)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_decoded(item, f"{path}[{index}]", depth + 1)


E = TypeVar("E", bound=enum.Enum)


class _Fields:
    """Typed reads of one decoded message; each refusal names the message and the field."""

    def __init__(self, data: dict[str, Any], what: str, names: tuple[str, ...]) -> None:
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ProtocolError(f"{what} has unknown fields {unknown}")
        missing = [name for name in names if name not in data]
        if missing:
            raise ProtocolError(f"{what} is missing fields {missing}")
        self.data = data
        self.what = what

    def _wrong(self, name: str, expected: str) -> ProtocolError:
        got = self.data[name]
        return ProtocolError(
            f"{self.what} field {name!r} must be {expected}, got {type(got).__name__} {got!r:.80}"
        )

    def integer(self, name: str, *, minimum: int) -> int:
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self._wrong(name, f"an int >= {minimum}")
        return value

    def number(self, name: str) -> float:
        value = self.data[name]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._wrong(name, "a float")
        return float(value)

    def text(self, name: str, *, optional: bool = False, nonempty: bool = True) -> Any:
        value = self.data[name]
        if value is None and optional:
            return None
        if not isinstance(value, str) or (nonempty and not value):
            raise self._wrong(name, "a non-empty str" if nonempty else "a str")
        return value

    def choice(self, name: str, kind: type[E], *, optional: bool = False) -> E | None:
        value = self.data[name]
        if value is None and optional:
            return None
        try:
            return kind(value)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in kind)
            raise self._wrong(name, f"one of {allowed}") from None

    def numbers(self, name: str) -> list[float] | None:
        value = self.data[name]
        if value is None:
            return None
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise self._wrong(name, "a non-empty list of floats, or nil")
        return [float(v) for v in value]

    def mapping(self, name: str) -> dict[str, Any]:
        value = self.data[name]
        if not isinstance(value, dict):
            raise self._wrong(name, "a map")
        return value


def _read(raw: bytes, cls: type, max_bytes: int) -> _Fields:
    what = cls.__name__
    data = decode_map(raw, what=what, max_bytes=max_bytes)
    names = tuple(f.name for f in fields(cls))
    read = _Fields(data, what, names)
    version = read.integer("v", minimum=0)
    if version != PROTOCOL_VERSION:
        raise ProtocolError(
            f"{what} has protocol version {version}; this side speaks {PROTOCOL_VERSION} "
            "(run the same optuna-rq version on the broker and the workers)"
        )
    return read


# -- messages ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialRequest:
    """Broker -> worker: run `objective` with `params` as attempt `attempt` of one trial."""

    study: str
    trial_number: int
    attempt: int
    objective: str  # "package.module:function"
    params: dict[str, Param]
    n_objectives: int  # the study's number of directions: the length a return must have
    reply_to: str  # the Redis stream the result goes to
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        """msgpack bytes; ProtocolError, naming the input, for params msgpack cannot carry."""
        check_params(self.params)
        return _pack(
            {
                "v": self.v,
                "study": self.study,
                "trial_number": self.trial_number,
                "attempt": self.attempt,
                "objective": self.objective,
                "params": self.params,
                "n_objectives": self.n_objectives,
                "reply_to": self.reply_to,
            }
        )

    @classmethod
    def decode(cls, raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> TrialRequest:
        read = _read(raw, cls, max_bytes)
        return cls(
            study=read.text("study"),
            trial_number=read.integer("trial_number", minimum=0),
            attempt=read.integer("attempt", minimum=1),
            objective=read.text("objective"),
            params=read.mapping("params"),
            n_objectives=read.integer("n_objectives", minimum=1),
            reply_to=read.text("reply_to"),
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialResult:
    """Worker -> broker: how one attempt of a trial ended.

    COMPLETE carries `values` (one per objective; NaN is allowed on the wire, the broker
    decides); FAIL carries a `fail_reason`; `values` is nil unless COMPLETE.
    """

    study: str
    trial_number: int
    attempt: int
    outcome: Outcome
    values: list[float] | None
    fail_reason: FailReason | None
    error: str | None
    worker: str
    duration_s: float
    v: int = PROTOCOL_VERSION

    def __post_init__(self) -> None:
        _check_consistent(self.outcome, self.values, self.fail_reason)

    def encode(self) -> bytes:
        return _pack(
            {
                "v": self.v,
                "study": self.study,
                "trial_number": self.trial_number,
                "attempt": self.attempt,
                "outcome": self.outcome.value,
                "values": self.values,
                "fail_reason": None if self.fail_reason is None else self.fail_reason.value,
                "error": self.error,
                "worker": self.worker,
                "duration_s": self.duration_s,
            }
        )

    @classmethod
    def decode(cls, raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> TrialResult:
        read = _read(raw, cls, max_bytes)
        outcome = read.choice("outcome", Outcome)
        assert outcome is not None
        duration_s = read.number("duration_s")
        if math.isnan(duration_s) or duration_s < 0:
            raise read._wrong("duration_s", "a float >= 0")
        return cls(
            study=read.text("study"),
            trial_number=read.integer("trial_number", minimum=0),
            attempt=read.integer("attempt", minimum=1),
            outcome=outcome,
            values=read.numbers("values"),
            fail_reason=read.choice("fail_reason", FailReason, optional=True),
            error=read.text("error", optional=True, nonempty=False),
            worker=read.text("worker", nonempty=False),
            duration_s=duration_s,
        )


def _check_consistent(
    outcome: Outcome, values: list[float] | None, reason: FailReason | None
) -> None:
    if outcome is Outcome.COMPLETE and (values is None or reason is not None):
        raise ProtocolError("TrialResult: COMPLETE needs values and no fail_reason")
    if outcome is Outcome.PRUNED and (values is not None or reason is not None):
        raise ProtocolError("TrialResult: PRUNED has neither values nor a fail_reason")
    if outcome is Outcome.FAIL and (reason is None or values is not None):
        raise ProtocolError("TrialResult: FAIL needs a fail_reason and no values")


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialCall:
    """Worker -> broker: one call a remote trial makes on the broker's real `optuna.Trial`.

    Calls travel on the result stream, so a `report` is told before the result that follows it;
    when `reply` is true the broker answers with a `TrialCallReply` on `reply_key(...)`.
    """

    study: str
    trial_number: int
    attempt: int
    seq: int
    method: str
    args: list[Param]
    kwargs: dict[str, Param]
    reply: bool
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        check_params({"args": self.args, "kwargs": self.kwargs})
        return _pack(
            {
                "v": self.v,
                "study": self.study,
                "trial_number": self.trial_number,
                "attempt": self.attempt,
                "seq": self.seq,
                "method": self.method,
                "args": self.args,
                "kwargs": self.kwargs,
                "reply": self.reply,
            }
        )

    @classmethod
    def decode(cls, raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> TrialCall:
        read = _read(raw, cls, max_bytes)
        args = read.data["args"]
        if not isinstance(args, list):
            raise read._wrong("args", "a list")
        reply = read.data["reply"]
        if not isinstance(reply, bool):
            raise read._wrong("reply", "a bool")
        return cls(
            study=read.text("study"),
            trial_number=read.integer("trial_number", minimum=0),
            attempt=read.integer("attempt", minimum=1),
            seq=read.integer("seq", minimum=1),
            method=read.text("method"),
            args=args,
            kwargs=read.mapping("kwargs"),
            reply=reply,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class TrialCallReply:
    """Broker -> worker: the value a `TrialCall` returned, or why it failed."""

    seq: int
    ok: bool
    value: Param
    error: str | None
    v: int = PROTOCOL_VERSION

    def encode(self) -> bytes:
        return _pack(
            {"v": self.v, "seq": self.seq, "ok": self.ok, "value": self.value, "error": self.error}
        )

    @classmethod
    def decode(cls, raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> TrialCallReply:
        read = _read(raw, cls, max_bytes)
        ok = read.data["ok"]
        if not isinstance(ok, bool):
            raise read._wrong("ok", "a bool")
        return cls(
            seq=read.integer("seq", minimum=1),
            ok=ok,
            value=read.data["value"],
            error=read.text("error", optional=True, nonempty=False),
        )


def reply_key(reply_to: str, trial_number: int, attempt: int) -> str:
    """The list a remote trial waits on for the broker's replies."""
    return f"{reply_to}:call:{trial_number}:{attempt}"


def lease_key(reply_to: str, job_id: str) -> str:
    """The key a worker holds while it runs one attempt (the RQ job `job_id`) for `reply_to`'s
    broker: it expires unless renewed, and a broker that finds it gone fails the attempt."""
    return f"{reply_to}:lease:{job_id}"
