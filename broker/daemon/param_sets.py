"""The parameter sets a study holds, indexed as Optuna's `enqueue_trial(skip_if_exists=True)`
compares them, so that enqueuing n sets costs O(n), not a walk over every trial per set.

Optuna's rule (`Study._should_skip_enqueue`, Optuna 4 and 5): a set is skipped if some trial's
parameters (its `fixed_params` system attribute if it was enqueued, else its `params`) have the
same names and, name by name, the new value is an instance of the stored value's type and is
`numpy.isclose` to it (rtol 1e-5, atol 0, NaN equal to NaN) if it is a real number, `==` to it
otherwise. `repeats` is that rule for one trial, verbatim; the index only finds the few trials
that could satisfy it: it hashes each set by its names and, per value, by a cell of a scale on
which a value and any value close to it in that sense are at most one cell apart.

The index mirrors the storage: `catch_up` reads the trials created since it last looked, by
number (by anyone: the broker's asks, other writers of the storage). A trial that may still
change (RUNNING or WAITING, not enqueued: a define-by-run trial gains parameters as it runs) is
kept aside and read again by `refresh`, before each slice of sets is checked against it.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from collections.abc import Hashable, Iterator, Mapping
from numbers import Real
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from optuna_rq.study.optuna_trials import frozen_trial

__all__ = ["RTOL", "ParamSetIndex", "repeats"]

RTOL = 1e-5
"""numpy.isclose's default rtol, which Optuna's skip rule uses (with atol=0)."""
_STEPS = 4096
"""Cells per binade: one is ~1/4096 to 1/8192 of a value wide, so a value's RTOL window crosses
a cell boundary in at most ~16% of cases (two cells to look in, else one), and values that are
not close share a cell only when they agree to about 4 significant digits."""
_Set = Mapping[str, Any]


def _isclose(a: float, b: float) -> bool:
    """numpy.isclose(a, b, rtol=RTOL, atol=0.0, equal_nan=True), for two Python floats."""
    if math.isfinite(a) and math.isfinite(b):
        return abs(a - b) <= RTOL * abs(b)
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b  # infinities: equal only to themselves


def repeats(params: _Set, existing: _Set) -> bool:
    """Whether enqueuing `params` repeats a trial whose parameters are `existing`: Optuna's
    `_should_skip_enqueue` for one trial."""
    if params.keys() != existing.keys():
        return False
    for name, value in params.items():
        old = existing[name]
        if not isinstance(value, type(old)):
            return False
        if isinstance(value, Real):
            if not _isclose(float(value), float(old)):
                return False
        elif not bool(value == old):
            return False
    return True


def _trial_params(trial: FrozenTrial) -> _Set:
    """What Optuna compares a new set with: the set it was enqueued with, else its params."""
    fixed = trial.system_attrs.get("fixed_params")
    return fixed if isinstance(fixed, Mapping) else trial.params


def _cell(x: float) -> int:
    """The cell of a finite, non-zero x >= 0 on a scale linear within each binade and
    continuous across them (so it is monotone in x); cells are centred on short mantissas,
    so that whole numbers and halves sit mid-cell."""
    mantissa, exponent = math.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    return math.floor(exponent * _STEPS + (2 * mantissa - 1) * _STEPS + 0.5)


def _stored_key(value: Any) -> Hashable:
    """The coarse key of a stored value: any value that repeats it has the same key, or (a real
    number) one of the keys `_query_keys` gives."""
    if isinstance(value, Real):
        x = float(value)
        if math.isnan(x):
            return "nan"
        if x == 0 or math.isinf(x):
            return ("exact", x)  # close to 0 or to an infinity means equal to it
        return ("real", x > 0, _cell(abs(x)))
    try:
        hash(value)
    except TypeError:
        return "unhashable"  # a list or a map: compared one by one
    return ("value", value)


def _query_keys(value: Any) -> list[Hashable]:
    """The keys under which a stored value that `value` repeats can be: one, or two cells."""
    if not isinstance(value, Real):
        return [_stored_key(value)]
    x = float(value)
    if math.isnan(x) or x == 0 or math.isinf(x):
        return [_stored_key(value)]
    # |x - b| <= RTOL * |b| holds for b between |x| / (1 + RTOL) and |x| / (1 - RTOL), with
    # x's sign; widened by far more than the rounding of these divisions.
    low = max(abs(x) / (1 + RTOL) * (1 - 1e-9), sys.float_info.min * sys.float_info.epsilon)
    high = min(abs(x) / (1 - RTOL) * (1 + 1e-9), sys.float_info.max)
    return [("real", x > 0, cell) for cell in range(_cell(low), _cell(high) + 1)]


def _set_key(params: _Set) -> tuple[Hashable, ...]:
    return tuple((name, _stored_key(params[name])) for name in sorted(params))


def _query_set_keys(params: _Set) -> Iterator[tuple[Hashable, ...]]:
    names = sorted(params)
    choices = [[(name, key) for key in _query_keys(params[name])] for name in names]
    return itertools.product(*choices)


class _Buckets:
    def __init__(self) -> None:
        self._sets: dict[tuple[Hashable, ...], list[_Set]] = {}

    def add(self, params: _Set) -> None:
        self._sets.setdefault(_set_key(params), []).append(params)

    def holds(self, params: _Set) -> bool:
        for key in _query_set_keys(params):
            if any(repeats(params, existing) for existing in self._sets.get(key, ())):
                return True
        return False


class ParamSetIndex:
    """The parameter sets of one study's trials; `holds(params)` is Optuna's skip rule."""

    def __init__(self, study: optuna.Study) -> None:
        self.study = study
        self.seen = 0  # trials read: numbers 0 .. seen - 1
        self._settled = _Buckets()  # trials whose parameters can no longer change
        self._changing: dict[int, _Set] = {}  # trial number -> parameters when last read
        self._changing_sets = _Buckets()

    def catch_up(self, deadline: float | None = None) -> bool:
        """Read the trials created since the last look; False if `deadline` (perf_counter)
        passed first (the rest is read on the next call)."""
        while deadline is None or time.perf_counter() < deadline:
            try:
                trial = frozen_trial(self.study, self.seen)
            except KeyError:
                return True  # no trial of that number yet: every trial is read
            self._read(trial)
            self.seen += 1
        return False

    def refresh(self) -> None:
        """Read again the trials that may have changed since (a few: those in flight)."""
        changing, self._changing = self._changing, {}
        for number in changing:
            self._read(frozen_trial(self.study, number))
        self._changing_sets = _Buckets()
        for params in self._changing.values():
            self._changing_sets.add(params)

    def holds(self, params: _Set) -> bool:
        """Whether Optuna's `enqueue_trial(params, skip_if_exists=True)` would skip `params`."""
        return self._settled.holds(params) or self._changing_sets.holds(params)

    def _read(self, trial: FrozenTrial) -> None:
        params = _trial_params(trial)
        if "fixed_params" in trial.system_attrs or trial.state.is_finished():
            self._settled.add(params)
        else:
            self._changing[trial.number] = params
            self._changing_sets.add(params)
