"""Objectives the benchmarks' workers serve (`--import benchmarks.objectives`)."""

from __future__ import annotations

import time


def noop(x: float) -> float:
    return x


def sleep_50ms(x: float) -> float:
    time.sleep(0.05)
    return x
