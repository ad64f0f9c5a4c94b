"""A slow sampler never holds results back: the broker samples for at most `ASK_BUDGET_S` per
turn before it sends what it has and reads the stream, so results (and remote-trial calls) are
told between the asks of a batch, not after it."""

from __future__ import annotations

import time
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.dispatch import ASK_BUDGET_S
from tests.support.inline_workers import InlineWorkers

pytestmark = pytest.mark.timeout(180)

SAMPLE_S = 0.1  # each ask takes longer than the budget: one ask per turn


class SlowSampler(optuna.samplers.RandomSampler):
    """A sampler as slow as TPE is after some thousands of trials."""

    def sample_independent(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(SAMPLE_S)
        return super().sample_independent(*args, **kwargs)


def test_results_are_told_between_the_asks_of_one_batch(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    assert SAMPLE_S > ASK_BUDGET_S
    prefix = inline_workers.start(count=2)
    study = optuna.create_study(sampler=SlowSampler(seed=3))
    opt = Optimizer(
        "tests.support.objectives:quadratic",
        concurrency=20,  # every slot free at the start: one batch of 20 asks
        n_trials=20,
        study=study,
        redis_url=redis_url,
        prefix=prefix,
    )
    opt.run(x=suggest.float(-1, 1))
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 20
    # Sampled all before anything was sent, the first told trial would come after the last
    # ask (about 2 s of sampling); sent as they are sampled, trials are told meanwhile.
    first_told = min(t.datetime_complete for t in trials)  # type: ignore[type-var]
    assert first_told < trials[-1].datetime_start, (first_told, trials[-1].datetime_start)
