"""Failpoints: let the fault tests kill the broker at an exact point with a real SIGKILL.

`OPTUNA_RQ_FAILPOINTS="after_ask=3"` makes the broker SIGKILL itself the 3rd time it passes
`hit("after_ask")`. Unset (always, outside the fault tests), `hit` is one dict lookup. Points:

    after_ask     a trial was asked (RUNNING in the storage) and not yet enqueued
    before_tell   a result was read from the stream and not yet told
    after_tell    a trial was told (in memory) and its journal not yet flushed
    after_flush   a journal was flushed and what it acknowledges not yet sent (the sends, the
                  acks, the replies or the status that follow)
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV_FAILPOINTS", "hit"]

ENV_FAILPOINTS = "OPTUNA_RQ_FAILPOINTS"


def _parse(text: str) -> dict[str, int]:
    points: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, count = item.partition("=")
        points[name] = int(count or "1")
    return points


_armed = _parse(os.environ.get(ENV_FAILPOINTS, ""))


def hit(name: str) -> None:
    """Count a pass through failpoint `name`; on the armed pass, die as SIGKILL would."""
    if name not in _armed:
        return
    _armed[name] -= 1
    if _armed[name] <= 0:
        os.kill(os.getpid(), signal.SIGKILL)
