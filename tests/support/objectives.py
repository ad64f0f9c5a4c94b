"""Objectives the test workers serve (`--import tests.support.objectives`)."""

from __future__ import annotations

import asyncio
import math
import os
import time

import optuna
import redis

from optuna_rq.plumbing.connection import connect

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


def define_by_run(trial: optuna.Trial) -> float:
    """The classic Optuna objective: sample, report, and let the pruner decide."""
    x = trial.suggest_float("x", -10, 10)
    trial.set_user_attr("pid", os.getpid())
    value = 0.0
    for step in range(5):
        value = (x - 2) ** 2 + 10.0 / (step + 1)
        trial.report(value, step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return value


def define_by_run_multi(trial: optuna.Trial) -> tuple[float, float]:
    x = trial.suggest_float("x", 0, 1)
    k = trial.suggest_int("k", 1, 3)
    c = trial.suggest_categorical("c", ["a", "b"])
    return x * k, (1 - x) + (1.0 if c == "b" else 0.0)


def legacy_suggest(trial: optuna.Trial) -> float:
    a = trial.suggest_uniform("a", 0, 1)  # type: ignore[attr-defined]
    b = trial.suggest_loguniform("b", 1e-3, 1)  # type: ignore[attr-defined]
    c = trial.suggest_discrete_uniform("c", 0, 1, 0.25)  # type: ignore[attr-defined]
    assert set(trial.params) == {"a", "b", "c"}
    assert trial.distributions["b"].log and trial.distributions["c"].step == 0.25
    assert trial.number >= 0 and trial.datetime_start is not None
    trial.set_system_attr("legacy", True)  # type: ignore[attr-defined]
    return a + b + c


def mixed(trial: optuna.Trial, depth: int, name: str) -> float:
    """Both forms at once: a proxy for define-by-run, and the params process() sampled."""
    lr = trial.suggest_float("lr", 1e-3, 1e-1, log=True)
    trial.set_user_attr("seen", f"{name}:{depth}")
    return lr * depth


def bad_suggestion(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 1.0, 0.0)  # low > high: Optuna on the broker refuses


def sleeps(x: float, hold_s: float = 0.3) -> float:
    time.sleep(hold_s)
    return x


def reports_pair(trial: optuna.Trial, x: float) -> tuple[float, float]:
    """Two objectives, both reported at each of three steps (`report(values, step)`), a user
    attribute set, and an infinite second value (Optuna takes it: the JSON outputs must too)."""
    for step in range(3):
        trial.report([x * step, float(step)], step)
    trial.set_user_attr("note", f"x={x:.3f}")
    return x, math.inf


def three_kinds(trial: optuna.Trial) -> float:
    """A float, an int on a log scale and a category: a relative sampler samples them jointly."""
    x = trial.suggest_float("x", -5, 5)
    k = trial.suggest_int("k", 1, 64, log=True)
    c = trial.suggest_categorical("c", ["a", "b", "c"])
    return (x - 1) ** 2 + abs(k - 8) / 8 + {"a": 0.5, "b": 0.0, "c": 1.0}[c]
