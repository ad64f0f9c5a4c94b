"""Objectives the test workers serve (`--import tests.objectives`)."""

from __future__ import annotations

import asyncio
import math
import os
import time

import optuna
import redis

from broker.connection import connect

_connections: dict[str, redis.Redis] = {}


def _conn(url: str) -> redis.Redis:
    if url not in _connections:
        _connections[url] = connect(url)
    return _connections[url]


def quadratic(x: float, depth: int = 0) -> float:
    return (x - 2.0) ** 2 + depth


def noop(x: float) -> float:
    return x


def capped(x: float, redis_url: str, key: str, hold_s: float = 0.05) -> float:
    """Counts the trials running at once in Redis, measured by the objectives themselves."""
    conn = _conn(redis_url)
    running = conn.incr(f"{key}:running")
    conn.rpush(f"{key}:samples", running)
    try:
        time.sleep(hold_s)
    finally:
        conn.decr(f"{key}:running")
    return x


def raises(x: float) -> float:
    raise ValueError(f"objective refuses x={x:.3f}")


def returns_str(x: float) -> str:
    return "not a number"


def returns_nan(x: float) -> float:
    return math.nan


def prunes(x: float) -> float:
    raise optuna.TrialPruned()


def pair(x: float, y: float) -> tuple[float, float]:
    return x**2, (y - 1) ** 2


async def async_quadratic(x: float) -> float:
    await asyncio.sleep(0)
    return (x - 1.0) ** 2


def nested(model: dict[str, object], seed: int) -> float:
    """Checks that nested inputs arrive nested, with fixed values next to sampled ones."""
    assert isinstance(model, dict), model
    assert model["name"] == "mlp", model
    assert seed == 42
    layers = model["layers"]
    assert isinstance(layers, dict) and isinstance(layers["units"], int), layers
    return float(model["lr"]) * layers["units"]  # type: ignore[arg-type]


def whoami(x: float) -> float:
    return float(os.getpid())


_private = quadratic
imported_name = math.sqrt
