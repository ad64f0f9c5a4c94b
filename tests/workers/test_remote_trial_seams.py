"""The remote trial where Optuna's own tests/trial_tests check a trial: `report` converts the
value before it checks the step, as in-process; `trial.study` has `metric_names`, `sampler` and
`pruner` (read-only stand-ins: they run on the broker); `trial.relative_search_space` is None
until the sampler inferred it, then what it inferred. Each on a real worker, compared with the
same objective run in-process by `study.optimize`."""

from __future__ import annotations

import warnings

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import Optimizer
from optuna_rq.study.verdict import FAIL_ERROR_ATTR
from tests.support import trial_objectives
from tests.support.inline_workers import InlineWorkers
from tests.support.trial_objectives import RelativeSampler

pytestmark = pytest.mark.timeout(120)

MODULE = ("tests.support.trial_objectives",)


def remote_and_in_process(
    redis_url: str, prefix: str, objective: str, make_study: type[optuna.Study] | object
) -> tuple[optuna.trial.FrozenTrial, optuna.trial.FrozenTrial]:
    """The one trial of `objective` run on a worker, and run in-process, each on a study from
    `make_study()`."""
    remote: optuna.Study = make_study()  # type: ignore[operator]
    Optimizer(
        f"tests.support.trial_objectives:{objective}",  # type: ignore[arg-type]
        concurrency=1,
        n_trials=1,
        study=remote,
        redis_url=redis_url,
        prefix=prefix,
    ).run()
    local: optuna.Study = make_study()  # type: ignore[operator]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's own, for the repeated step
        local.optimize(getattr(trial_objectives, objective), n_trials=1)
    [mine] = remote.trials
    [theirs] = local.trials
    for trial in (mine, theirs):
        assert trial.state is TrialState.COMPLETE, trial.user_attrs.get(FAIL_ERROR_ATTR)
    return mine, theirs


def test_report_checks_value_and_step_as_optuna_does(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    prefix = inline_workers.start(count=1, modules=MODULE)
    mine, theirs = remote_and_in_process(redis_url, prefix, "reports", optuna.create_study)
    outcomes = mine.user_attrs["outcomes"]
    assert outcomes == theirs.user_attrs["outcomes"]
    assert outcomes["str at a negative step"] == "TypeError"  # the value, converted first
    assert outcomes["negative step"] == "ValueError"
    assert outcomes["a step again"] == "UserWarning"
    assert mine.intermediate_values == pytest.approx(theirs.intermediate_values, nan_ok=True)


def _a_study_with_names_sampler_and_pruner() -> optuna.Study:
    study = optuna.create_study(
        sampler=RelativeSampler(), pruner=optuna.pruners.MedianPruner(n_startup_trials=1)
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        study.set_metric_names(["loss"])
    return study


def test_study_reads_and_relative_search_space_as_in_process(
    redis_url: str, inline_workers: InlineWorkers
) -> None:
    prefix = inline_workers.start(count=1, modules=MODULE)
    mine, theirs = remote_and_in_process(
        redis_url, prefix, "study_and_space", _a_study_with_names_sampler_and_pruner
    )
    seen = mine.user_attrs["seen"]
    assert seen == theirs.user_attrs["seen"]
    assert seen["before"] is None  # not inferred before the first suggestion
    assert list(seen["after"]) == ["x", "y"] and seen["relative_params"] == {"x": 5.5, "y": 5.5}
    assert (seen["x"], seen["w"]) == (5.5, 0.0)
    assert seen["metric_names"] == ["loss"]
    assert seen["sampler"] == "RelativeSampler" and seen["sampler_is"] == [True, True, False]
    assert seen["pruner"] == "MedianPruner" and seen["pruner_is"] == [True, True, False]


def test_the_sampler_and_pruner_on_a_worker_are_read_only_stand_ins() -> None:
    from optuna_rq.workers.remote_study import RemoteStudy

    views = {
        "sampler": ["optuna.samplers._tpe.sampler", "TPESampler"],
        "pruner": ["optuna_rq.not_loaded", "Custom"],
    }
    study = RemoteStudy(lambda _what: {**views, "metric_names": None})
    assert isinstance(study.sampler, optuna.samplers.TPESampler)
    with pytest.raises(AttributeError, match=r"sampler.reseed_rng on a worker: .* on the broker"):
        study.sampler.reseed_rng()
    assert study.metric_names is None
    # A class this process has not loaded is named, never imported.
    assert not isinstance(study.pruner, optuna.pruners.BasePruner)
    assert "optuna_rq.not_loaded.Custom" in repr(study.pruner)
