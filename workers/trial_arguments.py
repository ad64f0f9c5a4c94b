"""What a remote trial decides itself, before anything travels to the broker: Optuna's own
checks of a call's arguments, with Optuna's messages (`workers.remote_trial`)."""

from __future__ import annotations

import json
import warnings
from typing import Any

__all__ = ["as_float", "as_step", "deprecated", "storable"]


def storable(value: Any) -> None:
    """Raise what the broker's storage would for an attribute it cannot keep: Optuna's journal
    and SQL storages keep attributes as JSON."""
    json.dumps(value)


def as_float(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):  # Optuna's own message
        raise TypeError(
            f"The `value` argument is of type '{type(value)}' but supposed to be a float."
        ) from None


def as_step(step: Any) -> int:
    try:
        number = int(step)
    except (TypeError, ValueError):
        raise TypeError(
            f"The `step` argument is of type '{type(step)}' but supposed to be an int."
        ) from None
    if number < 0:
        raise ValueError(f"`step={number}` must be non-negative.")
    return number


def deprecated(old: str, new: str) -> None:
    warnings.warn(
        f"{old} has been deprecated in v3.0.0. This feature will be removed in v6.0.0. "
        f"Use {new} instead.",
        FutureWarning,
        stacklevel=3,
    )
