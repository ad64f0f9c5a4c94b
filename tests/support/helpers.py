"""Helpers tests import: `from tests.support.helpers import wait_until`."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(
    predicate: Callable[[], object],
    *,
    timeout_s: float,
    interval_s: float = 0.02,
    message: str = "",
) -> None:
    """Poll `predicate` until it returns something truthy; AssertionError after `timeout_s`.

    Tests poll instead of sleeping: they are as fast as the system allows, and a slow CI
    machine only makes them slower, not flaky.
    """
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() >= deadline:
            what = message or getattr(predicate, "__name__", repr(predicate))
            raise AssertionError(f"not true within {timeout_s:g}s: {what}")
        time.sleep(interval_s)
