"""Objectives of a second module, for routing tests: each records where it ran."""

from __future__ import annotations

import os
import time

import optuna


def where(trial: optuna.Trial, hold_s: float = 0.0) -> float:
    """Record the pool (env POOL), the process and its GPUs; hold for `hold_s` seconds."""
    x = trial.suggest_float("x", 0, 1)
    trial.set_user_attr("pool", os.environ.get("POOL", ""))
    trial.set_user_attr("pid", os.getpid())
    trial.set_user_attr("gpus", os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    time.sleep(hold_s)
    return x
