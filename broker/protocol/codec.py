"""The wire format's codec: msgpack maps under bounds, and messages whose schema is declared once.

Every message is a msgpack map of field name to value, with a protocol version `v`. Decoding
checks the size before unpacking, refuses ext types and non-str keys, bounds nesting depth and
container lengths, and refuses unknown, missing or mistyped fields; every failure is one
`ProtocolError` that names what was wrong. Nothing here can run code: there is no pickle, and
no hook that builds objects from the data.

A message is a frozen dataclass deriving from `Message`, each field declared with `wire(kind)`:
the kind says how the field is checked when decoded and how it is written, so `encode` and
`decode` are derived from the one declaration.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, TypeAlias, TypeVar

import msgpack

from optuna_rq.errors import ProtocolError

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "MAX_CONTAINER_LEN",
    "MAX_DEPTH",
    "PROTOCOL_VERSION",
    "Message",
    "Param",
    "check_params",
    "decode_map",
    "pack",
    "wire",
]

PROTOCOL_VERSION = 2
"""2: the package is `optuna_rq` (the job function moved to `optuna_rq.workers.runner`)."""
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024
MAX_DEPTH = 32
"""Nesting depth of maps and arrays in a message (the message itself is depth 1)."""
MAX_CONTAINER_LEN = 10_000
"""Entries in any one map or array."""

Param: TypeAlias = "None | bool | int | float | str | bytes | list[Param] | dict[str, Param]"


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


def pack(message: Mapping[str, object]) -> bytes:
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


# -- messages: the schema declared once --------------------------------------------------------

E = TypeVar("E", bound=enum.Enum)
M = TypeVar("M", bound="Message")


class WrongValue(Exception):
    """Raised by a `Kind` for a decoded value its field refuses; `expected` says what it takes
    (the message's decode turns it into a ProtocolError naming the message and the field)."""

    def __init__(self, expected: str) -> None:
        self.expected = expected


class Kind:
    """How one message field travels: `read` checks (and converts) a decoded value or raises
    `WrongValue`; `dump` writes the value msgpack carries. The base carries any decoded value."""

    optional: bool = False

    def read(self, value: Any) -> Any:
        if value is None and self.optional:
            return None
        return self.check(value)

    def check(self, value: Any) -> Any:
        return value

    def dump(self, value: Any) -> Any:
        return value


class Int(Kind):
    def __init__(self, *, minimum: int, maximum: int | None = None, optional: bool = False):
        self.minimum, self.maximum, self.optional = minimum, maximum, optional

    def check(self, value: Any) -> int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < self.minimum
            or (self.maximum is not None and value > self.maximum)
        ):
            upto = "" if self.maximum is None else f" and <= {self.maximum}"
            raise WrongValue(f"an int >= {self.minimum}{upto}")
        return value


class Float(Kind):
    """A float (an int is one too); `minimum` also refuses NaN."""

    def __init__(self, *, minimum: float | None = None, optional: bool = False) -> None:
        self.minimum, self.optional = minimum, optional

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WrongValue("a float" if self.minimum is None else f"a float >= {self.minimum:g}")
        number = float(value)
        if self.minimum is not None and (math.isnan(number) or number < self.minimum):
            raise WrongValue(f"a float >= {self.minimum:g}")
        return number


class Text(Kind):
    def __init__(self, *, optional: bool = False, nonempty: bool = True) -> None:
        self.optional, self.nonempty = optional, nonempty

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or (self.nonempty and not value):
            raise WrongValue("a non-empty str" if self.nonempty else "a str")
        return value


class Bool(Kind):
    def check(self, value: Any) -> bool:
        if not isinstance(value, bool):
            raise WrongValue("a bool")
        return value


class Choice(Kind):
    """A member of a str-valued enum, by its value."""

    def __init__(self, enum_type: type[enum.Enum], *, optional: bool = False) -> None:
        self.enum_type, self.optional = enum_type, optional

    def check(self, value: Any) -> enum.Enum:
        try:
            return self.enum_type(value)
        except ValueError:
            allowed = ", ".join(str(member.value) for member in self.enum_type)
            raise WrongValue(f"one of {allowed}") from None

    def dump(self, value: Any) -> Any:
        return None if value is None else value.value


class Floats(Kind):
    """A non-empty list of floats, or nil."""

    optional = True

    def check(self, value: Any) -> list[float]:
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        ):
            raise WrongValue("a non-empty list of floats, or nil")
        return [float(v) for v in value]


class Texts(Kind):
    """A non-empty list of non-empty strs."""

    def check(self, value: Any) -> list[str]:
        if (
            not isinstance(value, list)
            or not value
            or not all(isinstance(v, str) and v for v in value)
        ):
            raise WrongValue("a non-empty list of str")
        return list(value)


class Map(Kind):
    """A str-keyed map whose values are what msgpack carries (keys checked by `decode_map`)."""

    def __init__(self, *, optional: bool = False) -> None:
        self.optional = optional

    def check(self, value: Any) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise WrongValue("a map")
        return value


class List(Kind):
    def check(self, value: Any) -> list[Any]:
        if not isinstance(value, list):
            raise WrongValue("a list")
        return value


class Nested(Kind):
    """Another message, carried as a map inside this one."""

    def __init__(self, message: Callable[[], type[Message]]) -> None:
        self.message = message  # a thunk: the nested class may be defined later

    def check(self, value: Any) -> Message:
        if not isinstance(value, dict):
            raise WrongValue(f"a {self.message().__name__} map")
        return self.message().from_wire(value)

    def dump(self, value: Any) -> Any:
        return value.to_wire()


def wire(kind: Kind, **field_options: Any) -> Any:
    """Declare a message field and how it travels (`dataclasses.field` options pass through)."""
    return dataclasses.field(metadata={"wire": kind}, **field_options)


def version_field() -> Any:
    """The protocol version every message carries as `v`."""
    return wire(Int(minimum=0), default=PROTOCOL_VERSION)


class Message:
    """Base of the wire messages: frozen dataclasses whose fields are declared with `wire()`.

    `decode` refuses unknown, missing and mistyped fields and another protocol version with one
    `ProtocolError` naming the message and the field; a message whose `__post_init__` refuses
    the combination (a `ProtocolError`, or a `ValueError` such as `ConfigError`) is refused too.
    """

    __slots__ = ()
    v: int
    _kinds: ClassVar[dict[str, Kind]]

    @classmethod
    def _schema(cls) -> dict[str, Kind]:
        kinds = cls.__dict__.get("_kinds")
        if kinds is None:
            kinds = {f.name: f.metadata.get("wire", Kind()) for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            cls._kinds = kinds
        return kinds

    def to_wire(self) -> dict[str, Any]:
        """The message as the map that travels."""
        return {name: kind.dump(getattr(self, name)) for name, kind in self._schema().items()}

    def encode(self) -> bytes:
        return pack(self.to_wire())

    @classmethod
    def from_wire(cls: type[M], data: dict[str, Any]) -> M:
        """The message from a decoded map; ProtocolError names what is wrong."""
        what = cls.__name__
        kinds = cls._schema()
        unknown = sorted(set(data) - set(kinds))
        if unknown:
            raise ProtocolError(f"{what} has unknown fields {unknown}")
        missing = [name for name in kinds if name not in data]
        if missing:
            raise ProtocolError(f"{what} is missing fields {missing}")
        values: dict[str, Any] = {}
        for name in sorted(kinds, key=lambda name: name != "v"):  # the version first
            try:
                values[name] = kinds[name].read(data[name])
            except WrongValue as wrong:
                got = data[name]
                raise ProtocolError(
                    f"{what} field {name!r} must be {wrong.expected}, "
                    f"got {type(got).__name__} {got!r:.80}"
                ) from None
            if name == "v" and values[name] != PROTOCOL_VERSION:
                raise ProtocolError(
                    f"{what} has protocol version {values[name]}; this side speaks "
                    f"{PROTOCOL_VERSION} (run the same optuna-rq version on the broker, the "
                    "workers and the command line)"
                )
        try:
            return cls(**values)
        except ProtocolError:
            raise
        except (ValueError, TypeError) as exc:  # the message's own rules (ConfigError too)
            raise ProtocolError(f"{what} is invalid: {exc}") from exc

    @classmethod
    def decode(cls: type[M], raw: bytes, *, max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> M:
        return cls.from_wire(decode_map(raw, what=cls.__name__, max_bytes=max_bytes))
