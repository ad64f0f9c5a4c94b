"""A sampler too slow for its workers, for the sampler processes' tests: it must be importable
by module path, since the broker pickles it into its sampler processes."""

from __future__ import annotations

import time
from typing import Any

import optuna
from optuna.distributions import BaseDistribution
from optuna.trial import FrozenTrial


class SlowRandomSampler(optuna.samplers.RandomSampler):
    """RandomSampler taking `delay_s` of wall time a param: a sampler one process cannot keep
    up with once the workers ask for more than 1 / `delay_s` trials a second."""

    def __init__(self, seed: int | None = None, delay_s: float = 0.02) -> None:
        super().__init__(seed=seed)
        self.delay_s = delay_s
        self.relative_asks = 0
        """How often this copy was asked for a trial's relative params."""

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, BaseDistribution],
    ) -> dict[str, Any]:
        self.relative_asks += 1
        return super().sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        time.sleep(self.delay_s)
        return super().sample_independent(study, trial, param_name, param_distribution)
