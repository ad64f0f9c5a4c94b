"""Objectives that return what Optuna's `study.tell` takes (numpy scalars, 0-d arrays, sequences
of them) and what it refuses, and that raise what would end a process (`--import
tests.support.result_objectives`).

Which value a trial returns is picked by its number, so one study runs every kind, in order, on
a worker or in-process alike; tests compare each trial with what Optuna itself makes of it.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import optuna

Returns = dict[str, Callable[[], object]]


class Model:
    """What an objective may return by mistake: an object with no float in it."""

    def __repr__(self) -> str:
        return "Model(layers=3)"


# One value each, for a study with one direction: every one `study.tell` accepts (NaN it
# accepts and records FAIL, as it does in study.optimize).
SINGLE_TAKEN: Returns = {
    "float": lambda: 0.25,
    "int": lambda: 3,
    "bool": lambda: True,
    "np.float32": lambda: np.float32(0.5),
    "np.float64": lambda: np.float64(1.5),
    "np.float16": lambda: np.float16(2.5),
    "np.int64": lambda: np.int64(7),
    "np.int32": lambda: np.int32(-4),
    "np.bool_": lambda: np.bool_(False),
    "0-d array": lambda: np.array(0.75),
    "0-d int array": lambda: np.array(9, dtype=np.int16),
    "np.mean": lambda: np.mean([1.0, 2.0, 4.0]),
    "inf": lambda: math.inf,
    "-inf": lambda: -math.inf,
    "np.inf": lambda: np.float32(np.inf),
    "nan": lambda: math.nan,
    "np.nan": lambda: np.float32(np.nan),
    "1-tuple": lambda: (np.float32(0.125),),
    "1-list": lambda: [np.int64(11)],
}

# What it refuses: each ends FAIL (`bad_return`) with Optuna's reason, never COMPLETE.
SINGLE_REFUSED: Returns = {
    "str": lambda: "abc",
    "numeric str": lambda: "0.5",
    "dict": lambda: {"loss": 0.5},
    "None": lambda: None,
    "two values": lambda: (0.5, 0.5),
    "empty tuple": lambda: (),
    "1-d array": lambda: np.array([0.5]),
    "int beyond a double": lambda: 10**400,
    "an object": lambda: Model(),
}

# For a study with two directions.
MULTI_TAKEN: Returns = {
    "tuple of floats": lambda: (0.5, 1.5),
    "tuple of numpy": lambda: (np.float32(0.5), np.float64(1.5)),
    "list of numpy": lambda: [np.int64(1), np.array(2.0)],
    "mixed": lambda: (True, np.float16(0.5)),
    "inf": lambda: (math.inf, -math.inf),
    "nan": lambda: (np.float32(np.nan), 1.0),
}

MULTI_REFUSED: Returns = {
    "one float": lambda: 0.5,
    "three values": lambda: (1.0, 2.0, 3.0),
    "a str inside": lambda: ("a", 1.0),
    "None inside": lambda: (None, 1.0),
    "2-element array": lambda: np.array([1.0, 2.0]),
    "str": lambda: "ab",
    "dict": lambda: {"a": 1.0, "b": 2.0},
}

SINGLE = {**SINGLE_TAKEN, **SINGLE_REFUSED}
MULTI = {**MULTI_TAKEN, **MULTI_REFUSED}


def single(trial: optuna.Trial) -> object:
    """Trial n returns the n-th kind of `SINGLE`."""
    return list(SINGLE.values())[trial.number]()


def multi(trial: optuna.Trial) -> object:
    """Trial n returns the n-th kind of `MULTI`."""
    return list(MULTI.values())[trial.number]()


# -- what would end a process ------------------------------------------------------------------


def parses_arguments(trial: optuna.Trial) -> float:
    """A training script's argparse, inside the objective: an unknown option is SystemExit(2)."""
    trial.set_user_attr("pid", os.getpid())
    parser = argparse.ArgumentParser(prog="train")
    parser.add_argument("--epochs", type=int, default=1)
    parser.parse_args(["--epochs", "1", "--no-such-option"])
    return 0.0


def exits(trial: optuna.Trial) -> float:
    trial.set_user_attr("pid", os.getpid())
    raise SystemExit("cannot train: no data")


async def exits_async(trial: optuna.Trial) -> float:
    trial.set_user_attr("pid", os.getpid())
    raise SystemExit(3)


def interrupted(trial: optuna.Trial) -> float:
    trial.set_user_attr("pid", os.getpid())
    raise KeyboardInterrupt


def runs_on(trial: optuna.Trial) -> float:
    """What a worker serves after the trials above: a plain trial on the same process."""
    trial.set_user_attr("pid", os.getpid())
    return trial.suggest_float("x", 0, 1)


def blocks(trial: optuna.Trial, release: str) -> float:
    """Says it started (its pid in `<release>.started`), then runs until `release` exists."""
    Path(f"{release}.started").write_text(str(os.getpid()))
    while not os.path.exists(release):
        time.sleep(0.02)
    return 1.0
