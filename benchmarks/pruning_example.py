"""Optuna's pruning example through optuna-rq (one worker, cap 1) against the same study
in-process: wall time and its ratio (goal: within 1.5x). A seeded TPE sampler and a median
pruner; 100 steps a trial, each `report` then `should_prune`.

    uv run python -m benchmarks.pruning_example [TRIALS]
"""

from __future__ import annotations

import sys
import time

import optuna

from benchmarks.objectives import pruning_example
from benchmarks.redis_server import embedded_redis
from benchmarks.run import OurWorkers
from optuna_rq import Optimizer
from optuna_rq.plumbing.connection import connect


def study() -> optuna.Study:
    return optuna.create_study(
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=10),
    )


def main() -> None:
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 30
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with embedded_redis("prune") as url:
        workers = OurWorkers(url, 1)
        try:
            remote = study()
            started = time.perf_counter()
            Optimizer(
                "benchmarks.objectives:pruning_example",
                1,
                trials,
                study=remote,
                connection=connect(url),
                prefix=workers.queue,
            ).run()
            remote_s = time.perf_counter() - started
        finally:
            workers.stop()
    local = study()
    started = time.perf_counter()
    local.optimize(pruning_example, n_trials=trials)
    local_s = time.perf_counter() - started
    steps = sum(len(t.intermediate_values) for t in remote.trials)
    print(f"trials: {trials}, steps reported through optuna-rq: {steps}")
    ratio = remote_s / local_s
    print(f"in-process: {local_s:.2f} s; optuna-rq: {remote_s:.2f} s; ratio {ratio:.2f}")


if __name__ == "__main__":
    main()
