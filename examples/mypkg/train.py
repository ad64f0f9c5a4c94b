"""The README's objectives. From `examples/`, as the README's command-line section runs them:

    optuna-rq workers --import mypkg.train --count 8
    optuna-rq submit mypkg.train:objective --space space.yaml --n-trials 200 --concurrency 16 --wait
    optuna-rq submit mypkg.train:learning_curve --pruner median --n-trials 100 --concurrency 8

`objective`, a stand-in for training a model, takes one argument per top-level name of
`space.yaml` (the nested `model` arrives as a dict); `learning_curve` takes `trial` and samples
its own parameters (define-by-run), reporting a curve a pruner can stop early. The README shows
both as they are written here (tests/processes/test_readme.py checks it).
"""

from __future__ import annotations

import random

import optuna


def objective(x: float, depth: int, booster: str, model: dict, seed: int) -> float:
    noise = random.Random(seed).random() * 1e-3
    return (x - 2) ** 2 + depth * model["lr"] + (0.05 if booster == "dart" else 0.0) + noise


def learning_curve(trial: optuna.Trial) -> float:
    x = trial.suggest_float("x", -10, 10)
    for step in range(10):
        trial.report((x - 2) ** 2 + 1 / (step + 1), step)
        if trial.should_prune():
            raise optuna.TrialPruned()
    return (x - 2) ** 2
