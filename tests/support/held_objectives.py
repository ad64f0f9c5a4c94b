"""Objectives a test holds until it lets them go (`--import tests.support.held_objectives`): the
trials of a study stopping, or changed, while some of them still run.

    KEY:started   list: the x of each call, in the order they started
    KEY:go        list: the test pushes one item per call it lets return
"""

from __future__ import annotations

import redis

from optuna_rq.plumbing.connection import connect

_connections: dict[str, redis.Redis] = {}

HOLD_S = 60
"""The longest a call waits for its go before it returns anyway."""


def held(x: float, redis_url: str, key: str) -> float:
    """Say it started, wait for the test's go, return `x`."""
    if redis_url not in _connections:
        _connections[redis_url] = connect(redis_url)
    conn = _connections[redis_url]
    conn.rpush(f"{key}:started", repr(x))
    conn.blpop([f"{key}:go"], timeout=HOLD_S)
    return x
