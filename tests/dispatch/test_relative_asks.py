"""When the broker asks a trial's sampler for its relative params, by every way a trial is made
on the loop before it is sent: asked at the send where Optuna would ask at a first suggestion
(a trial of a define-by-run study, fresh), once where the space is sampled at the ask, and never
where its params were decided elsewhere: a retry of a lost attempt (Optuna asks only at a
suggestion of a name not settled, which the worker then sends to the broker) and a trial the
sampler process sampled (its relative params came back with it)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optuna
import pytest
import redis

from optuna_rq import suggest
from optuna_rq.dispatch import Budget, RunSpec, StudyRun
from optuna_rq.dispatch.retries import plan_retry
from optuna_rq.dispatch.runs import InFlight, Phase
from optuna_rq.dispatch.sending import TrialSender
from optuna_rq.protocol import Keys, Record, Role, Signer, TrialRequest
from optuna_rq.study.optuna_trials import create_running_trial, given_relative
from tests.support.slow_samplers import SlowRandomSampler

pytestmark = pytest.mark.timeout(60)

WORKER = Signer.from_env(Role.WORKER, {})


def _run(inputs: dict[str, Any]) -> StudyRun:
    sampler = SlowRandomSampler(seed=0, delay_s=0.0)
    return StudyRun(
        study=optuna.create_study(sampler=sampler),
        spec=RunSpec(objective="tests.support.objectives:quadratic", inputs=inputs, concurrency=1),
        budget=Budget(10),
    )


def _fresh(run: StudyRun) -> InFlight:
    return run.track(run.study.ask(), attempt=1, phase=Phase.UNSENT)


def _retried(run: StudyRun) -> InFlight:
    lost = _fresh(run)
    lost.trial.suggest_float("x", 0, 1)
    _verdict, retry = plan_retry(run, lost, "its worker was lost")
    assert retry is not None
    return run.track(retry, attempt=2, phase=Phase.UNSENT)


def _sampled_elsewhere(run: StudyRun) -> InFlight:
    """As the loop makes a trial the sampler process sampled, from what came back with it."""
    copy = optuna.create_study(sampler=SlowRandomSampler(seed=1, delay_s=0.0))
    there = copy.ask()
    x = there.suggest_float("x", 0, 1)
    trial = create_running_trial(
        run.study,
        params={"x": x},
        distributions={"x": optuna.distributions.FloatDistribution(0, 1)},
        user_attrs={},
        relative=given_relative(there),
    )
    return run.track(trial, attempt=1, phase=Phase.UNSENT)


DEFINE_BY_RUN: dict[str, Any] = {}
AT_THE_ASK: dict[str, Any] = {"x": suggest.float(0, 1)}

WAYS: list[tuple[str, dict[str, Any], Callable[[StudyRun], InFlight], int, bool]] = [
    # (how the trial is made, the study's inputs, making it, relative asks, a view carried)
    ("fresh, define-by-run", DEFINE_BY_RUN, _fresh, 1, True),
    ("fresh, its space sampled at the ask", AT_THE_ASK, _fresh, 1, False),
    ("a retry of a lost attempt", DEFINE_BY_RUN, _retried, 1, False),  # the lost one's ask
    ("sampled in the sampler process", AT_THE_ASK, _sampled_elsewhere, 0, False),
]


@pytest.mark.parametrize(
    ("way", "inputs", "make", "asks", "carried"), WAYS, ids=[w[0] for w in WAYS]
)
def test_the_sampler_is_asked_for_relative_params_only_where_optuna_would(
    conn: redis.Redis,
    prefix: str,
    way: str,
    inputs: dict[str, Any],
    make: Callable[[StudyRun], InFlight],
    asks: int,
    carried: bool,
) -> None:
    run = _run(inputs)
    record = make(run)
    sender = TrialSender(conn, keys=Keys(prefix), reply_to=f"{prefix}:results", signer=Signer())
    request = TrialRequest.decode(WORKER.open(Record.REQUEST, sender.seal(run, record)))
    sampler = run.study.sampler
    assert isinstance(sampler, SlowRandomSampler)
    assert sampler.relative_asks == asks, way
    assert (request.relative is not None) == carried, way
