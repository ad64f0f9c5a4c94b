"""The command line's names for the fields the protocol's errors name.

The protocol refuses a value naming its field as the wire does (`trial_timeout_s`); the command
line shows the same words naming the flag that gave it (`--trial-timeout`), so that what a user
reads names what they typed.
"""

from __future__ import annotations

from optuna_rq.protocol.field_error import FieldError

__all__ = ["FLAG_OF_FIELD", "flag_of", "shown"]

FLAG_OF_FIELD = {
    "name": "--study-name",
    "directions": "--direction",
    "trial_timeout_s": "--trial-timeout",
    "timeout_s": "--timeout",
}
"""The fields whose flag is not the field's name as a flag (`max_retries`: `--max-retries`)."""


def flag_of(field: str) -> str:
    """The flag that gives `field`."""
    return FLAG_OF_FIELD.get(field) or "--" + field.replace("_", "-")


def shown(exc: BaseException) -> str:
    """`exc`'s message as the command line shows it: a field named by its flag."""
    return exc.shown_with(flag_of) if isinstance(exc, FieldError) else str(exc)
