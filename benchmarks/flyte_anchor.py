"""flytekitplugins-optuna 1.16 in-process: the anchor for the API optuna-rq is a drop-in for.

It is not one of our dependencies (it pins its own Optuna), so `benchmarks.run` runs this file in
an environment of its own and reads the JSON it prints:

    uv run --no-project --with flytekitplugins-optuna==1.16.31 python benchmarks/flyte_anchor.py

The objectives are plain callbacks, the way the plugin runs without a Flyte cluster: the no-op
one returns its suggestion; the sleeping one holds its thread for 50 ms, as a CPU-bound objective
would, with `concurrency` trials allowed at once.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import statistics
import time
from collections.abc import Callable
from importlib.metadata import version

import optuna
from flytekitplugins.optuna import Optimizer

SLEEP_S = 0.05


def noop(trial: optuna.Trial) -> float:
    return trial.suggest_float("x", 0, 1)


def sleep_50ms(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", 0, 1)
    time.sleep(SLEEP_S)
    return x


def trials_per_s(
    objective: Callable[[optuna.Trial], float],
    sampler: optuna.samplers.BaseSampler,
    concurrency: int,
    n: int,
) -> float:
    study = optuna.create_study(sampler=sampler)
    optimizer = Optimizer(objective, concurrency=concurrency, n_trials=n, study=study)
    started = time.perf_counter()
    asyncio.run(optimizer())
    elapsed = time.perf_counter() - started
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == n
    return n / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--noop-trials", type=int, default=1000)
    parser.add_argument("--sleep-trials", type=int, default=40)
    parser.add_argument("--workers", default="1,2,4,8", help="concurrency values, comma-separated")
    args = parser.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def median(once: Callable[[], float]) -> float:
        return statistics.median(once() for _ in range(args.reps))

    noop_rate = median(
        lambda: trials_per_s(noop, optuna.samplers.RandomSampler(), 2, args.noop_trials)
    )
    scaling = {}
    for count in (int(c) for c in args.workers.split(",")):
        rate = median(
            functools.partial(
                lambda c: trials_per_s(
                    sleep_50ms, optuna.samplers.TPESampler(), c, args.sleep_trials
                ),
                count,
            )
        )
        scaling[count] = {"trials_per_s": rate, "efficiency": rate / (count / SLEEP_S)}
    print(
        json.dumps(
            {
                "version": version("flytekitplugins-optuna"),
                "optuna": optuna.__version__,
                "noop_trials_per_s": noop_rate,
                "scaling": scaling,
            }
        )
    )


if __name__ == "__main__":
    main()
