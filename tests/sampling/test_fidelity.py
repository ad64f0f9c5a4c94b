"""What the sampler sees: the broker asks as `study.optimize` would, so a seeded sampler at
concurrency 1 gives `study.optimize`'s params, and the storage never holds more RUNNING trials of
a study than its cap (unless the study is submitted with --ask-ahead)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import Optimizer, suggest
from optuna_rq.storage.storage_access import default_storage_url, open_storage
from tests.support import objectives
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

N_TRIALS = 14  # past TPE's 10 startup trials: the model-based asks are compared too
SEED = 42


def _in_process_params() -> list[dict[str, object]]:
    """The params `study.optimize` samples with a seeded TPE for the quadratic's space."""
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=SEED))
    study.optimize(
        lambda t: objectives.quadratic(t.suggest_float("x", -10, 10), t.suggest_int("depth", 0, 3)),
        n_trials=N_TRIALS,
    )
    return [t.params for t in study.trials]


def test_a_seeded_cli_study_at_cap_1_samples_what_study_optimize_samples(
    run_cli, broker_process, workers_factory, cli_state
) -> None:
    workers_factory(count=2)  # more workers than the cap: nothing else may change the order
    result = run_cli(
        "submit",
        "tests.support.objectives:quadratic",
        "--study-name",
        "seeded",
        "--param",
        "x={type: float, low: -10, high: 10}",
        "--param",
        "depth={type: integer, low: 0, high: 3}",
        "--n-trials",
        str(N_TRIALS),
        "--concurrency",
        "1",
        "--sampler",
        "tpe",
        "--seed",
        str(SEED),
        "--wait",
    )
    assert result.returncode == 0, result.stderr
    study = optuna.load_study(
        study_name="seeded", storage=open_storage(default_storage_url(cli_state))
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * N_TRIALS
    assert [t.params for t in study.trials] == _in_process_params()


def test_a_seeded_remote_optimizer_at_cap_1_samples_what_study_optimize_samples(
    redis_url: str, workers_factory
) -> None:
    prefix = workers_factory(count=2)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=SEED))
    opt = Optimizer(
        "tests.support.objectives:quadratic",
        concurrency=1,
        n_trials=N_TRIALS,
        study=study,
        redis_url=redis_url,
        prefix=prefix,
    )
    opt.run(x=suggest.float(-10, 10), depth=suggest.integer(0, 3))
    assert [t.params for t in study.trials] == _in_process_params()


def _max_running_while(run_cli, cli_state, name: str, *submit_args: str) -> int:
    """Submit `name` (sleeping objectives, cap 2, more workers than that), then read the storage
    as a dashboard would until the study ends: the most RUNNING trials it ever held at once."""
    result = run_cli(
        "submit",
        "tests.support.objectives:sleeps",
        "--study-name",
        name,
        "--param",
        "x={type: float, low: 0, high: 1}",
        "--n-trials",
        "8",
        "--concurrency",
        "2",
        "--sampler",
        "random",
        *submit_args,
    )
    assert result.returncode == 0, result.stderr
    storage = open_storage(default_storage_url(cli_state))
    most = 0

    def ended() -> bool:
        nonlocal most
        try:
            trials = optuna.load_study(study_name=name, storage=storage).trials
        except KeyError:  # not created yet
            return False
        most = max(most, sum(t.state is TrialState.RUNNING for t in trials))
        return len(trials) == 8 and all(t.state.is_finished() for t in trials)

    wait_until(ended, timeout_s=120, interval_s=0.02)
    trials = optuna.load_study(study_name=name, storage=storage).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 8
    return most


def test_the_storage_never_holds_more_running_trials_than_the_cap(
    run_cli, broker_process, workers_factory, cli_state
) -> None:
    workers_factory(count=3)  # a trial sampled before a slot frees would show as a third
    assert _max_running_while(run_cli, cli_state, "capped") == 2


def test_asking_ahead_is_the_studys_choice_and_keeps_its_counts(
    run_cli, broker_process, workers_factory, cli_state
) -> None:
    workers_factory(count=3)
    # Two objectives run at a time, and while they do the broker holds the next trial sampled.
    assert _max_running_while(run_cli, cli_state, "ahead", "--ask-ahead", "1") == 3
