"""Objectives the benchmarks' workers serve (`--import benchmarks.objectives`)."""

from __future__ import annotations

import time


def noop(x: float) -> float:
    return x


def sleep_50ms(x: float) -> float:
    time.sleep(0.05)
    return x


def round_trips(  # type: ignore[no-untyped-def]
    trial, prunes: int = 200, suggests: int = 50
) -> float:
    """Times `should_prune` and `suggest_float` round trips from the worker, in milliseconds."""
    prune_ms = []
    for _ in range(prunes):
        started = time.perf_counter()
        trial.should_prune()
        prune_ms.append((time.perf_counter() - started) * 1000)
    suggest_ms = []
    for i in range(suggests):
        started = time.perf_counter()
        trial.suggest_float(f"p{i}", 0, 1)
        suggest_ms.append((time.perf_counter() - started) * 1000)
    trial.set_user_attr("should_prune_ms", sorted(prune_ms))
    trial.set_user_attr("suggest_ms", sorted(suggest_ms))
    return 0.0


def short_round_trips(trial) -> float:  # type: ignore[no-untyped-def]
    """`round_trips` in short trials (20 `should_prune`, 5 `suggest_float`), so many of them
    end within a window of load (benchmarks/fleet.py's probe)."""
    return round_trips(trial, prunes=20, suggests=5)


def started_at(x: float) -> float:
    """Returns when it started (epoch seconds): the benchmark measures dispatch latency with it."""
    return time.time()


def raw_rq_job(done_key: str) -> None:
    """A plain RQ job doing nothing but count itself done: the raw-RQ anchor's unit of work."""
    from rq import get_current_job

    get_current_job().connection.incr(done_key)  # type: ignore[union-attr]


def raw_rq_sleep_50ms(done_key: str) -> None:
    """A plain RQ job that sleeps 50 ms: raw RQ's own scaling, with no Optuna and no broker."""
    time.sleep(0.05)
    raw_rq_job(done_key)


def pruning_example(trial) -> float:  # type: ignore[no-untyped-def]
    """The shape of Optuna's pruning example: one suggestion, then 100 steps of a little work,
    each reported and followed by `should_prune`."""
    x = trial.suggest_float("x", -10, 10)
    value = 0.0
    for step in range(100):
        value = sum((x - 2) ** 2 / (i + step + 1) for i in range(5000))  # ~1 ms, as a fit
        trial.report(value, step)
        if trial.should_prune():
            import optuna

            raise optuna.TrialPruned()
    return value
