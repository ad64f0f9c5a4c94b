"""Objectives only the workers import (`optuna-rq workers --path tests/support/workers_only --import
elsewhere`): the command line cannot import this module, as when a laptop submits to a cluster,
so what `submit` would check here is checked on the workers."""

from __future__ import annotations


def takes_x(x: float) -> float:
    return x
