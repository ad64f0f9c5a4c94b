"""Optuna's pruning example through optuna-rq (one worker, cap 1) against the same study
in-process: wall time and its ratio (goal: within 1.5x). A seeded TPE sampler and a median
pruner; 100 steps a trial, each `report` then `should_prune`. At cap 1 the two prune the same
trials (the same params, the same pruner's view): the report says whether they did.

    uv run python -m benchmarks.pruning_example [TRIALS]

runs it once; `python -m benchmarks.run` runs the section (`--only pruning` for it alone).
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import optuna

from benchmarks.objectives import pruning_example
from benchmarks.redis_server import embedded_redis
from benchmarks.run import OurWorkers, _command_calls, redis_cpu_s
from optuna_rq import Optimizer
from optuna_rq.plumbing.connection import connect

__all__ = ["measure", "report_lines", "section"]

GOAL = 1.5


def study() -> optuna.Study:
    return optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10),
    )


def _remote(url: str, workers: OurWorkers, trials: int) -> tuple[dict[str, float], optuna.Study]:
    conn = connect(url)
    remote = study()
    calls, others = _command_calls(conn), workers.cpu_s() + redis_cpu_s(conn)
    cpu, started = time.process_time(), time.perf_counter()
    Optimizer(
        "benchmarks.objectives:pruning_example",
        1,
        trials,
        study=remote,
        connection=conn,
        prefix=workers.queue,
    ).run()
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    others = workers.cpu_s() + redis_cpu_s(conn) - others
    steps = sum(len(t.intermediate_values) for t in remote.trials)
    commands = sum(_command_calls(conn).values()) - sum(calls.values())
    figures = {
        "remote_s": wall,
        "steps": float(steps),
        "cpu_ms_per_step": (cpu + others) * 1000 / steps,
        "commands_per_step": commands / steps,
    }
    return figures, remote


def _local(trials: int) -> tuple[float, optuna.Study]:
    local = study()
    started = time.perf_counter()
    local.optimize(pruning_example, n_trials=trials)
    return time.perf_counter() - started, local


def measure(url: str, trials: int, reps: int) -> dict[str, Any]:
    """`reps` runs of each, in turn; the medians, and whether every run pruned what in-process
    pruned."""
    remote_runs: list[dict[str, float]] = []
    local_s: list[float] = []
    same = True
    workers = OurWorkers(url, 1)
    try:
        for _ in range(reps):
            figures, remote = _remote(url, workers, trials)
            remote_runs.append(figures)
            seconds, local = _local(trials)
            local_s.append(seconds)
            same &= [t.state for t in remote.trials] == [t.state for t in local.trials]
    finally:
        workers.stop()
    row = {k: statistics.median(r[k] for r in remote_runs) for k in remote_runs[0]}
    row["local_s"] = statistics.median(local_s)
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in local.trials)
    return {
        **row,
        "trials": trials,
        "pruned": pruned,
        "same_pruned": same,
        "ratio": row["remote_s"] / row["local_s"],
    }


def section(url: str, *, quick: bool = False) -> dict[str, Any]:
    return {
        "command": "python -m benchmarks.run --only pruning" + (" --quick" if quick else ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        **measure(url, 10 if quick else 30, 1 if quick else 3),
    }


def report_lines(p: dict[str, Any]) -> list[str]:
    """benchmarks/report.md's section for `section`'s figures."""
    return [
        "## Optuna's pruning example: one worker, cap 1",
        "",
        f"{p['trials']} trials of 100 steps (about 1 ms of work, `report`, `should_prune`); a "
        "seeded TPE sampler and a median pruner; medians of the runs. Goal: optuna-rq within "
        f"{GOAL}x of in-process.",
        "",
        "| | wall | ratio | CPU a step | Redis commands a step |",
        "|---|---|---|---|---|",
        f"| in-process `study.optimize` | {p['local_s']:.2f} s | 1.00x | | |",
        f"| optuna-rq, the objective on a worker | {p['remote_s']:.2f} s | {p['ratio']:.2f}x "
        f"| {p['cpu_ms_per_step']:.2f} ms | {p['commands_per_step']:.1f} |",
        "",
        f"{p['pruned']} of {p['trials']} trials pruned in-process; optuna-rq pruned "
        + ("the same trials" if p["same_pruned"] else "other trials")
        + " in every run. CPU a step: the Optimizer's, the worker's and redis-server's, over "
        f"{p['steps']:.0f} steps reported.",
        "",
    ]


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with embedded_redis("prune") as url:
        figures = measure(url, trials, 1)
    print("\n".join(report_lines(figures)))


if __name__ == "__main__":
    main()
