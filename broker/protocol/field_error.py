"""A refused value of a message's field, in words that name fields as placeholders.

The protocol names a field as the wire does (`seed`, `trial_timeout_s`); each front door knows
it by a name of its own (the command line's `--seed`, `--trial-timeout`). A `FieldError` keeps
its words with the fields as `{placeholders}`, so its message names the wire's fields, and a
front door shows the same words with its own names (`shown_with`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from optuna_rq.errors import ConfigError

__all__ = ["FieldError"]


class FieldError(ConfigError):
    """`field`'s value refused: `words` is a `str.format` template in which `values` fill their
    placeholders and every other placeholder is a field's name (`{seed} must be an integer from
    0 to {high}, got {value!r}`, with `high` and `value` given)."""

    def __init__(self, field: str, words: str, **values: Any) -> None:
        self.field = field
        self.words = words
        self.values = values
        super().__init__(self.shown_with(str))

    def shown_with(self, name_of: Callable[[str], str]) -> str:
        """The message with each field named by `name_of(field)`."""
        return self.words.format_map(_Names(self.values, name_of))

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuilt, (self.field, self.words, self.values))


def _rebuilt(field: str, words: str, values: dict[str, Any]) -> FieldError:
    """A FieldError from what `__reduce__` keeps (it crosses a process as a pickle)."""
    return FieldError(field, words, **values)


class _Names(dict[str, Any]):
    """The values of a template, and a field's name for any other placeholder."""

    def __init__(self, values: dict[str, Any], name_of: Callable[[str], str]) -> None:
        super().__init__(values)
        self.name_of = name_of

    def __missing__(self, key: str) -> str:
        return self.name_of(key)
