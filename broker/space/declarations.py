"""Search-space declarations and `process()`, as in flytekitplugins.optuna 1.16.

A search space is a (nested) dict of inputs. Each `Suggestion` in it is replaced by the value a
trial samples for it, under its dotted path (`{"model": {"lr": Float(...)}}` samples `model.lr`);
every other value is a fixed input and passes through unchanged.

The constructors validate themselves and raise `ConfigError`, which is a `ValueError` like the
original's errors, so existing `except ValueError` code keeps working.
"""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from copy import copy
from dataclasses import dataclass
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from optuna_rq.errors import ConfigError

if TYPE_CHECKING:
    import optuna  # the trials that sample a space are Optuna's; declaring one needs none

__all__ = ["Category", "Float", "Integer", "Number", "Suggestion", "process", "suggest"]


class Suggestion:
    """Base of every search-space entry that a trial samples."""


class Number(Suggestion):
    """A numeric range `[low, high]`, optionally stepped or log-scaled."""

    low: Any
    high: Any
    step: Any
    log: bool

    def __post_init__(self) -> None:
        name = type(self).__name__
        if self.low >= self.high:
            raise ConfigError(
                f"low must be less than high: {name}(low={self.low!r}, high={self.high!r})"
            )
        if self.step is not None and self.step > (self.high - self.low):
            raise ConfigError(
                "step must be less than the range of the suggestion: "
                f"{name}(low={self.low!r}, high={self.high!r}, step={self.step!r})"
            )
        # The two rules below are Optuna's; checking them here reports a space that can never be
        # sampled when it is written, not at the first trial.
        if self.step is not None and self.step <= 0:
            raise ConfigError(f"step must be greater than 0: {name}(step={self.step!r})")
        if self.log and self.low <= 0:
            raise ConfigError(
                f"a log-scaled range needs low > 0: {name}(low={self.low!r}, log=True)"
            )


@dataclass
class Float(Number):
    """A float in `[low, high]`; `step` discretises it, `log` samples it log-uniformly."""

    low: float
    high: float
    step: float | None = None
    log: bool = False

    def __post_init__(self) -> None:
        if math.isnan(self.low) or math.isnan(self.high):
            raise ConfigError(
                f"low and high must be numbers: Float(low={self.low}, high={self.high})"
            )
        super().__post_init__()
        if self.log and self.step is not None:
            raise ConfigError(
                f"a Float cannot be both stepped and log-scaled: Float(step={self.step!r}, "
                "log=True); drop one of them"
            )


@dataclass
class Integer(Number):
    """An integer in `[low, high]` with a `step` (default 1), optionally log-scaled."""

    low: int
    high: int
    step: int = 1
    log: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.log and self.step != 1:
            raise ConfigError(
                f"a log-scaled Integer needs step=1: Integer(step={self.step!r}, log=True)"
            )


@dataclass
class Category(Suggestion):
    """One of `choices` (None, bool, int, float or str, as Optuna accepts)."""

    choices: list[Any]

    def __post_init__(self) -> None:
        if len(self.choices) == 0:
            raise ConfigError("a Category needs at least one choice: Category(choices=[])")


suggest = SimpleNamespace(float=Float, integer=Integer, category=Category)


def _suggester(trial: optuna.Trial, value: Suggestion) -> Callable[..., Any]:
    if isinstance(value, Float):
        return trial.suggest_float
    if isinstance(value, Integer):
        return trial.suggest_int
    if isinstance(value, Category):
        return trial.suggest_categorical
    raise ConfigError(
        f"unknown suggestion type {type(value).__name__}: use suggest.float, suggest.integer "
        "or suggest.category"
    )


def process(
    trial: optuna.Trial, inputs: MutableMapping[str, Any], root: list[str] | None = None
) -> MutableMapping[str, Any]:
    """Replace, in place, every `Suggestion` in `inputs` by the value `trial` samples for it.

    Nested dicts are walked; a suggestion at `inputs["model"]["lr"]` is sampled as the parameter
    `"model.lr"`. Fixed values are left as they are. Returns `inputs` (mutated), so callers who
    reuse a space pass a deep copy, as `Optimizer` does.
    """
    if root is None:
        root = []

    for key, value in inputs.items():
        path = copy(root) + [str(key)]

        if isinstance(value, Suggestion):
            inputs[key] = _suggester(trial, value)(name=".".join(path), **vars(value))

        elif isinstance(value, dict):
            inputs[key] = process(trial=trial, inputs=value, root=path)

    return inputs
