"""Sampling off the loop: trials are asked on a thread of their own, so a slow ask holds back no
result, no acknowledgement and no remote-trial call (the sampler here blocks for real, on an
event, in the dispatcher's own process); a study stopped while an ask is in progress leaves no
trial RUNNING; and what the sampling thread warns stays out of the calls' answers."""

from __future__ import annotations

import asyncio
import threading
import time
import warnings
from typing import Any

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.dispatch.calls import _this_threads_warnings
from optuna_rq.protocol import FailReason
from optuna_rq.verdict import FAIL_REASON_ATTR
from tests.helpers import wait_until

pytestmark = pytest.mark.timeout(180)


class GatedSampler(optuna.samplers.RandomSampler):
    """Random, but the ask of trial `from_trial` and later ones waits for `gate`."""

    def __init__(self, from_trial: int) -> None:
        super().__init__(seed=5)
        self.from_trial = from_trial
        self.gate = threading.Event()
        self.asking = threading.Event()  # an ask waits at the gate
        self.ask_threads: set[str] = set()

    def before_trial(self, study: optuna.Study, trial: Any) -> None:
        self.ask_threads.add(threading.current_thread().name)
        if trial.number >= self.from_trial:
            self.asking.set()
            assert self.gate.wait(120), "the test never opened the gate"
        super().before_trial(study, trial)


def test_calls_and_results_are_served_while_an_ask_waits(redis_url: str, workers_factory) -> None:
    """Trials 0 and 1 run a define-by-run objective (a suggest, five reports and five
    should_prune calls each, all answered by the broker) while the ask of trial 2 waits: were
    the asks on the loop, nothing would be answered or told until the gate opens."""
    prefix = workers_factory(count=2)
    sampler = GatedSampler(from_trial=2)
    study = optuna.create_study(sampler=sampler)
    opt = Optimizer(
        "tests.objectives:define_by_run",
        concurrency=2,
        n_trials=4,
        study=study,
        redis_url=redis_url,
        prefix=prefix,
    )
    failures: list[BaseException] = []

    def open_the_gate_once_both_are_told() -> None:
        try:
            wait_until(sampler.asking.is_set, timeout_s=60, message="trial 2 is being asked")
            told = (TrialState.COMPLETE, TrialState.PRUNED)
            wait_until(
                lambda: (
                    [t.state in told for t in study.get_trials(deepcopy=False)[:2]] == [True, True]
                ),
                timeout_s=60,
                message="trials 0 and 1 told while the ask of trial 2 waits",
            )
        except BaseException as exc:
            failures.append(exc)
        finally:
            sampler.gate.set()

    opener = threading.Thread(target=open_the_gate_once_both_are_told)
    opener.start()
    opt.run()
    opener.join()
    if failures:
        raise failures[0]
    trials = study.trials
    assert len(trials) == 4 and TrialState.RUNNING not in [t.state for t in trials]
    assert all(t.intermediate_values for t in trials)  # every trial's calls were answered
    assert sampler.ask_threads == {"optuna-rq-sampling"}  # never on the loop's thread


def test_a_run_cancelled_while_an_ask_waits_leaves_no_trial_running(
    redis_url: str, workers_factory
) -> None:
    """Cancelled with the ask of trial 2 in progress and that of trial 3 requested: trial 2,
    once asked, ends FAIL (cancelled), as does trial 3 if its ask began before the loop saw the
    cancellation."""
    prefix = workers_factory(count=2)
    sampler = GatedSampler(from_trial=2)
    study = optuna.create_study(sampler=sampler)
    opt = Optimizer(
        "tests.objectives:quadratic",
        concurrency=2,
        n_trials=4,
        study=study,
        redis_url=redis_url,
        prefix=prefix,
    )

    async def cancel_mid_ask() -> None:
        run = asyncio.ensure_future(opt(x=suggest.float(-1, 1)))
        assert await asyncio.to_thread(sampler.asking.wait, 60), "trial 2 was never asked"
        wait_until(  # trial 1 told too: trial 3's ask is requested, behind trial 2's
            lambda: study.get_trials(deepcopy=False)[1].state is TrialState.COMPLETE,
            timeout_s=60,
        )
        run.cancel()
        await asyncio.sleep(0)  # the cancellation reaches the dispatcher's stop event
        sampler.gate.set()
        with pytest.raises(asyncio.CancelledError):
            await run

    asyncio.run(cancel_mid_ask())
    trials = study.trials
    assert [t.state for t in trials[:3]] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL]
    assert len(trials) <= 4 and TrialState.RUNNING not in [t.state for t in trials]
    for trial in trials[2:]:
        assert trial.state is TrialState.FAIL
        assert trial.user_attrs[FAIL_REASON_ATTR] == FailReason.CANCELLED.value


class SlowSampler(optuna.samplers.RandomSampler):
    """A sampler as slow as TPE is after some thousands of trials."""

    def sample_independent(self, *args: Any, **kwargs: Any) -> Any:
        time.sleep(0.1)
        return super().sample_independent(*args, **kwargs)


def test_trials_go_out_as_they_are_sampled(redis_url: str, workers_factory) -> None:
    prefix = workers_factory(count=2)
    study = optuna.create_study(sampler=SlowSampler(seed=3))
    opt = Optimizer(
        "tests.objectives:quadratic",
        concurrency=20,  # every slot free at the start: 20 asks requested at once
        n_trials=20,
        study=study,
        redis_url=redis_url,
        prefix=prefix,
    )
    opt.run(x=suggest.float(-1, 1))
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 20
    # Sent only once all were sampled, the first told trial would come after the last ask
    # (about 2 s of sampling); sent as they are sampled, trials are told meanwhile.
    first_told = min(t.datetime_complete for t in trials)  # type: ignore[type-var]
    assert first_told < trials[-1].datetime_start, (first_told, trials[-1].datetime_start)


def test_a_calls_warnings_are_its_own_not_the_sampling_threads() -> None:
    other_warned = threading.Event()
    shown: list[str] = []
    previous = warnings.showwarning
    warnings.showwarning = lambda message, *rest: shown.append(str(message))  # type: ignore[assignment]
    try:
        with _this_threads_warnings() as caught:
            warnings.warn("the call's own", UserWarning, stacklevel=1)
            other = threading.Thread(
                target=lambda: (
                    warnings.warn("the sampler's", UserWarning, stacklevel=1),
                    other_warned.set(),
                )
            )
            other.start()
            other.join()
            warnings.warn("the call's own", UserWarning, stacklevel=1)  # again: each is said
        assert other_warned.is_set()
        assert [str(w.message) for w in caught] == ["the call's own"] * 2
        assert shown == ["the sampler's"]  # where it would have gone: the broker's log
        warnings.warn("after the call", UserWarning, stacklevel=1)
        assert shown == ["the sampler's", "after the call"]
    finally:
        warnings.showwarning = previous
