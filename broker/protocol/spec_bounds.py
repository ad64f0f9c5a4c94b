"""The bounds of every number a study's definition carries, and the checks that hold them, one
rule for every front door: what RQ, Redis, the OS and Optuna accept, with room to spare, so that
a value refused downstream is refused at once, naming its field and the limit."""

from __future__ import annotations

import math
from typing import TypeVar

from optuna_rq.protocol.choices import StrChoice
from optuna_rq.protocol.field_error import FieldError

__all__ = [
    "MAX_ASK_AHEAD",
    "MAX_BATCH",
    "MAX_CONCURRENCY",
    "MAX_N_TRIALS",
    "MAX_PRIORITY",
    "MAX_RETRIES",
    "MAX_SEED",
    "MAX_TIMEOUT_S",
    "MAX_TRIAL_TIMEOUT_S",
    "check_max_retries",
    "check_settings",
    "check_trial_timeout",
    "choice_of",
    "int_in",
    "positive_number",
]

MAX_TIMEOUT_S = 366 * 24 * 3600.0
"""The longest `timeout_s`: a bound, so a typo in the unit is refused rather than run for ages."""

MAX_TRIAL_TIMEOUT_S = 30 * 24 * 3600
"""`trial_timeout_s` at most 30 days: RQ's job timeout is whole seconds, armed with signal.alarm
(a C int: about 68 years) and stored with EXPIRE; a month is more than any trial should run."""
MAX_N_TRIALS = 10**9
MAX_CONCURRENCY = 100_000
MAX_RETRIES = 100
MAX_ASK_AHEAD = 1_000
MAX_BATCH = 32
"""`batch` at most 32 trials in one RQ job: the job's id names each of them (`Keys.batch_job_id`),
and a batch is for trials short enough that a few dozen take less than a second."""
MAX_PRIORITY = 1e6
"""`priority` at most 1e6: a weight among studies, summed with the others' in fair share."""
MAX_SEED = 2**32 - 1
"""`seed` in [0, 2**32 - 1]: what numpy's RandomState, behind every Optuna sampler, takes."""


C = TypeVar("C", bound=StrChoice)


def choice_of(choices: type[C], field: str, value: object) -> C:
    """`value` as a member of `choices`; FieldError naming `field` and its choices if none."""
    try:
        return choices(value)
    except ValueError:
        raise FieldError(
            field,
            f"{{{field}}} {{value!r}}: choose one of {{choices}}",
            value=value,
            choices=", ".join(choices.values()),
        ) from None


def check_trial_timeout(seconds: object, *, option: str = "trial_timeout_s") -> int | None:
    """A trial timeout (`StudySpec.trial_timeout_s`, `Optimizer(trial_timeout=...)`) as the whole
    seconds it runs for (None: none); FieldError naming `option` (the field, or the caller's
    name for it) for anything else.

    RQ's job timeout (the alarm a worker raises in the objective) is whole seconds: a fraction
    would silently run rounded up, so it is refused instead; so is more than 30 days
    (`MAX_TRIAL_TIMEOUT_S`)."""
    if seconds is None:
        return None
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
    ):
        raise FieldError(
            option, f"{{{option}}} must be whole seconds (a number), got {{value!r}}", value=seconds
        )
    if seconds < 1 or seconds != int(seconds):
        raise FieldError(
            option,
            f"{{{option}}} {{value:g}}: trial timeouts are whole seconds >= 1 (RQ's job "
            "timeout is); use {below} or {above}",
            value=seconds,
            below=max(1, int(seconds)),
            above=max(1, int(seconds)) + 1,
        )
    if seconds > MAX_TRIAL_TIMEOUT_S:
        shown = f"{seconds:.0f}" if seconds < 1e15 else f"{seconds:g}"
        raise FieldError(
            option,
            f"{{{option}}} must be > 0 and at most {{high}} seconds (30 days), got {{value}}",
            high=MAX_TRIAL_TIMEOUT_S,
            value=shown,
        )
    return int(seconds)


def check_max_retries(value: object, *, option: str = "max_retries") -> int:
    """How many times a trial whose worker was lost runs again (`StudySpec.max_retries`,
    `Optimizer(max_retries=...)`); FieldError naming `option` (the field, or the caller's name
    for it) unless a whole number from 0 to `MAX_RETRIES`."""
    if not int_in(value, 0, MAX_RETRIES):
        raise FieldError(
            option,
            f"{{{option}}} must be an integer from 0 to {{high}}, got {{value!r}}",
            high=MAX_RETRIES,
            value=value,
        )
    assert isinstance(value, int)
    return value


def check_settings(
    *, n_trials: object = None, concurrency: object = None, priority: object = None
) -> None:
    """The budget, cap and priority a submission or a `set` gives (None: not given), each within
    its bounds; FieldError naming the field otherwise. One rule for both, so that `set` is
    refused where `submit` would be, and before it is sent as the broker would refuse it."""
    if n_trials is not None:
        _positive_int("n_trials", n_trials, MAX_N_TRIALS)
    if concurrency is not None:
        _positive_int("concurrency", concurrency, MAX_CONCURRENCY)
    if priority is not None and not positive_number(priority, MAX_PRIORITY):
        raise FieldError(
            "priority",
            "{priority} must be a number > 0 and at most {high:g}, got {value!r}",
            high=MAX_PRIORITY,
            value=priority,
        )


def int_in(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _positive_int(field: str, value: object, high: int) -> None:
    if not int_in(value, 1, high):
        raise FieldError(
            field,
            f"{{{field}}} must be an integer from 1 to {{high}}, got {{value!r}}",
            high=high,
            value=value,
        )


def positive_number(value: object, high: float) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and 0 < value <= high
    )
