"""Define-by-run objectives on workers: a trial proxy whose calls the broker runs for real."""

from __future__ import annotations

import threading
from collections.abc import Callable

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.errors import RemoteTrialError
from optuna_rq.protocol import Keys, TrialMethod, TrialRequest
from optuna_rq.protocol.signing import Signer
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from optuna_rq.workers.remote_trial import RemoteTrial
from tests.support.inline_workers import InlineWorkers
from tests.support.objectives import define_by_run, three_kinds

pytestmark = pytest.mark.timeout(120)


def remote(objective: str, queue: str, redis_url: str, **kwargs: object) -> Optimizer:
    return Optimizer(objective, redis_url=redis_url, prefix=queue, **kwargs)  # type: ignore[arg-type]


def test_define_by_run_with_a_median_pruner(redis_url: str, inline_workers: InlineWorkers) -> None:
    queue = inline_workers.start(count=2)
    study = optuna.create_study(
        sampler=optuna.samplers.RandomSampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=3),
    )
    opt = remote(
        "tests.support.objectives:define_by_run",
        queue,
        redis_url,
        concurrency=2,
        n_trials=24,
        study=study,
    )
    opt.run()
    trials = study.trials
    states = [t.state for t in trials]
    assert len(trials) == 24 and TrialState.RUNNING not in states
    assert states.count(TrialState.PRUNED) > 0 and states.count(TrialState.COMPLETE) > 0
    for trial in trials:
        assert set(trial.params) == {"x"}
        assert trial.intermediate_values, trial.number  # every report reached the study
        assert isinstance(trial.user_attrs["pid"], int)
        if trial.state is TrialState.PRUNED:  # Optuna keeps the last reported value
            last = trial.intermediate_values[max(trial.intermediate_values)]
            assert trial.value == pytest.approx(last)
        else:
            assert sorted(trial.intermediate_values) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reports_sent_without_a_wait_prune_as_in_process_at_cap_1(
    redis_url: str, inline_workers: InlineWorkers, seed: int
) -> None:
    """`report` does not wait for the broker; `should_prune` does, after it. A seeded study run
    one trial at a time samples, reports and prunes exactly as it does in-process."""

    def make() -> optuna.Study:
        return optuna.create_study(
            sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=4),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=1),
        )

    queue = inline_workers.start(count=1)
    mine = make()
    remote(
        "tests.support.objectives:define_by_run", queue, redis_url, concurrency=1, n_trials=14,
        study=mine,
    ).run()  # fmt: skip
    theirs = make()
    theirs.optimize(define_by_run, n_trials=14)

    def seen(study: optuna.Study) -> list[tuple[object, ...]]:
        return [(t.state, t.params, t.intermediate_values, t.value) for t in study.trials]

    assert seen(mine) == seen(theirs)
    assert TrialState.PRUNED in {t.state for t in mine.trials}


@pytest.mark.parametrize(
    ("sampler", "relative_at_least"),
    [
        # Every param of every trial after the 3 it samples independently.
        (
            lambda seed: optuna.samplers.TPESampler(
                seed=seed, multivariate=True, n_startup_trials=3
            ),
            3 * 9,
        ),
        # From the second generation on, what crossover gives (mutation drops some params,
        # which the sampler then samples independently: those ask the broker).
        (lambda seed: optuna.samplers.NSGAIISampler(seed=seed, population_size=4), 8),
    ],
    ids=["tpe-multivariate", "nsgaii"],
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_relative_params_sent_with_the_job_sample_as_in_process_at_cap_1(
    redis_url: str,
    inline_workers: InlineWorkers,
    monkeypatch: pytest.MonkeyPatch,
    sampler: Callable[[int], optuna.samplers.BaseSampler],
    relative_at_least: int,
    seed: int,
) -> None:
    """The params a relative sampler gives a trial travel with its job: a suggestion that takes
    one is answered on the worker, and recorded on the broker without a wait. A seeded study run
    one trial at a time samples exactly as in-process, and most suggestions make no round
    trip once the sampler has a relative search space."""
    sent: list[TrialMethod] = []
    sealed = RemoteTrial._sealed  # every call the worker sends is sealed there

    def spy(trial: RemoteTrial, method: TrialMethod, payload: bytes) -> bytes:
        sent.append(method)
        return sealed(trial, method, payload)

    monkeypatch.setattr(RemoteTrial, "_sealed", spy)
    queue = inline_workers.start(count=1)
    mine = optuna.create_study(sampler=sampler(seed))
    remote(
        "tests.support.objectives:three_kinds", queue, redis_url, concurrency=1, n_trials=12,
        study=mine,
    ).run()  # fmt: skip
    theirs = optuna.create_study(sampler=sampler(seed))
    theirs.optimize(three_kinds, n_trials=12)

    def seen(study: optuna.Study) -> list[tuple[object, ...]]:
        return [(t.state, t.params, t.distributions, t.value) for t in study.trials]

    assert seen(mine) == seen(theirs)
    waited = sum(m.value.startswith("suggest_") for m in sent)
    answered_here = sent.count(TrialMethod.SUGGESTED)
    assert waited + answered_here == 3 * 12
    assert answered_here >= relative_at_least, (waited, answered_here)


def test_a_fixed_param_is_not_taken_from_the_relative_params_sent_with_the_job(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    """An enqueued trial's fixed params win over the sampler's relative ones, as in-process:
    its other params are still taken from the job."""

    def make() -> optuna.Study:
        sampler = optuna.samplers.TPESampler(seed=0, multivariate=True, n_startup_trials=3)
        return optuna.create_study(sampler=sampler)

    queue = inline_workers.start(count=1)
    mine, theirs = make(), make()
    for n_trials in (5, 3):
        remote(
            "tests.support.objectives:three_kinds", queue, redis_url, concurrency=1,
            n_trials=n_trials, study=mine,
        ).run()  # fmt: skip
        theirs.optimize(three_kinds, n_trials=n_trials)
        for study in (mine, theirs):
            study.enqueue_trial({"x": 0.25})
    assert [t.params for t in mine.trials] == [t.params for t in theirs.trials]
    assert mine.trials[5].params["x"] == 0.25


def test_define_by_run_multi_objective(redis_url: str, inline_workers: InlineWorkers) -> None:
    queue = inline_workers.start(count=2)
    study = optuna.create_study(directions=["minimize", "minimize"])
    remote(
        "tests.support.objectives:define_by_run_multi",
        queue,
        redis_url,
        concurrency=2,
        n_trials=6,
        study=study,
    ).run()
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 6
    assert all(set(t.params) == {"x", "k", "c"} for t in study.trials)


def test_legacy_suggest_methods_and_attributes(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    queue = inline_workers.start(count=1)
    opt = remote(
        "tests.support.objectives:legacy_suggest", queue, redis_url, concurrency=1, n_trials=3
    )
    opt.run()
    trials = opt.study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 3, [
        t.user_attrs.get(FAIL_ERROR_ATTR) for t in trials
    ]
    for t in trials:
        assert isinstance(t.distributions["a"], optuna.distributions.FloatDistribution)
        assert t.distributions["c"].step == 0.25
        assert t.system_attrs["legacy"] is True


def test_mixed_form_gets_the_proxy_and_the_sampled_params(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    queue = inline_workers.start(count=1)
    opt = remote("tests.support.objectives:mixed", queue, redis_url, concurrency=1, n_trials=3)
    opt.run(depth=suggest.integer(1, 4), name="net")
    for t in opt.study.trials:
        assert t.state is TrialState.COMPLETE
        assert set(t.params) == {"depth", "lr"}
        assert t.user_attrs["seen"] == f"net:{t.params['depth']}"
        assert t.value == pytest.approx(t.params["lr"] * t.params["depth"])


def test_a_bad_suggestion_fails_the_trial_with_optunas_error(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    queue = inline_workers.start(count=1)
    opt = remote(
        "tests.support.objectives:bad_suggestion", queue, redis_url, concurrency=1, n_trials=1
    )
    opt.run()
    [trial] = opt.study.trials
    assert trial.state is TrialState.FAIL and trial.user_attrs[FAIL_REASON_ATTR] == "exception"
    assert "ValueError" in trial.user_attrs[FAIL_ERROR_ATTR]  # checked on the worker, as Optuna


def test_a_call_for_a_trial_the_broker_does_not_own_gets_a_clear_error(
    conn: redis.Redis, prefix: str
) -> None:
    study = optuna.create_study()
    dispatcher = Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results")
    run = StudyRun(
        study=study,
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={},
            concurrency=1,
        ),
        budget=Budget(1),
    )
    dispatcher.add(run)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            dispatcher.poll(0.05)

    server = threading.Thread(target=serve)
    server.start()
    try:
        for number in (0, 99):  # 0 was never asked; 99 does not exist
            request = TrialRequest(
                study=study.study_name,
                incarnation=run.spec.incarnation,
                trial_number=number,
                attempt=1,
                objective="tests.support.objectives:quadratic",
                params={},
                n_objectives=1,
                reply_to=f"{prefix}:results",
            )
            with pytest.raises(RemoteTrialError, match="not running on this broker"):
                RemoteTrial(conn, request, Signer(), keys=Keys(prefix)).suggest_float("x", 0, 1)
    finally:
        stop.set()
        server.join()
