"""What the broker and its sampler process send each other, over a pipe between the two (both
are this package at one version: they are pickled, never seen by anyone else)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from optuna.distributions import BaseDistribution

__all__ = ["READY", "SampleFailed", "SampleRequest", "Sampled"]

READY = "ready"
"""The sampler process's first word: it imported what it needs and reached Redis."""


@dataclass(frozen=True, slots=True)
class SampleRequest:
    """Sample `n` trials of `study` (in the journal file `journal`), each through `process()` on
    `inputs`. A study's first request to a process carries its sampler: to the first process, as
    the broker's loop left it (its random state too), so that it samples on from there; to any
    other, a copy to `reseed` there, so that two processes never draw the same numbers."""

    request_id: int
    study: str
    journal: str
    inputs: dict[str, Any]
    n: int
    sampler: bytes | None = None  # the study's sampler, pickled: in its first request only
    reseed: bool = False  # `BaseSampler.reseed_rng` the sampler above, as Optuna's n_jobs does


@dataclass(frozen=True, slots=True)
class Sampled:
    """One trial of request `request_id`, sampled: the broker creates it with these."""

    request_id: int
    params: dict[str, Any]
    distributions: dict[str, BaseDistribution]
    user_attrs: dict[str, Any]
    system_attrs: dict[str, Any]
    sample_s: float  # the ask and `process()`, in the sampler process
    relative: tuple[dict[str, BaseDistribution], dict[str, Any]] | None = None
    """The relative search space and params its sampler gave (`relative_view`), None if it was
    not asked: the broker's trial keeps them, and does not ask its own copy again."""


@dataclass(frozen=True, slots=True)
class SampleFailed:
    """One trial of request `request_id` could not be sampled there: the broker asks it itself
    (and meets the same error, if it is the space's, which it reports as the trial's)."""

    request_id: int
    error: str
