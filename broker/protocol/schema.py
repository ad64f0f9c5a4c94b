"""Message schemas, declared once: each field with the kind of value it carries.

A message is a frozen dataclass deriving from `Message`, each field declared with `wire(kind)`:
the kind says how the field is checked when decoded and how it is written, so `encode` and a
strict `decode` (unknown, missing and mistyped fields refused, one `ProtocolError` naming the
message and the field) are derived from the one declaration.
"""

from __future__ import annotations

import dataclasses
import enum
import math
import re
from collections.abc import Callable, Collection
from typing import Any, ClassVar, TypeVar

from optuna_rq.errors import ProtocolError
from optuna_rq.protocol.codec import (
    DEFAULT_MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    decode_map,
    pack,
    peek_map,
)

__all__ = [
    "Bool",
    "Choice",
    "Choices",
    "Float",
    "Floats",
    "Int",
    "Kind",
    "List",
    "Map",
    "Matching",
    "Message",
    "Nested",
    "Text",
    "Texts",
    "WrongValue",
    "version_field",
    "wire",
]

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


class Matching(Kind):
    """A str that `pattern` matches whole (`expected` says what that is, for the error)."""

    def __init__(self, pattern: re.Pattern[str], expected: str, *, optional: bool = False):
        self.pattern, self.expected, self.optional = pattern, expected, optional

    def check(self, value: Any) -> str:
        if not isinstance(value, str) or not self.pattern.fullmatch(value):
            raise WrongValue(self.expected)
        return value


class Bool(Kind):
    def __init__(self, *, optional: bool = False) -> None:
        self.optional = optional

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


class Choices(Kind):
    """A non-empty list of members of a str-valued enum, by their values."""

    def __init__(self, enum_type: type[enum.Enum]) -> None:
        self.choice = Choice(enum_type)

    def check(self, value: Any) -> list[enum.Enum]:
        if not isinstance(value, list) or not value:
            allowed = ", ".join(str(member.value) for member in self.choice.enum_type)
            raise WrongValue(f"a non-empty list, each one of {allowed}")
        try:
            return [self.choice.check(item) for item in value]
        except WrongValue as wrong:
            raise WrongValue(f"a non-empty list, each {wrong.expected}") from None

    def dump(self, value: Any) -> Any:
        return [self.choice.dump(item) for item in value]


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

    @classmethod
    def peek(cls, raw: bytes, names: Collection[str]) -> dict[str, Any]:
        """Fields `names` of an encoded message that does not decode whole (`codec.peek_map`),
        each checked as its kind, the others unread: enough to tell its sender why it was
        refused. ProtocolError if one is missing or refused too."""
        kinds = cls._schema()
        data = peek_map(raw, names, what=cls.__name__)
        values: dict[str, Any] = {}
        for name in names:
            if name not in data:
                raise ProtocolError(f"{cls.__name__} has no field {name!r} to read")
            try:
                values[name] = kinds[name].read(data[name])
            except WrongValue as wrong:
                raise ProtocolError(
                    f"{cls.__name__} field {name!r} must be {wrong.expected}"
                ) from None
        return values
