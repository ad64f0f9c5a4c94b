"""The remote trial is an Optuna trial: the same surface, reads and exceptions as in-process, on
real workers; artifacts, callbacks, and the daemon's stop conditions."""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import pytest
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState

from optuna_rq import Optimizer
from optuna_rq.client import BrokerClient
from optuna_rq.dispatch import ATTEMPT_ATTR, RETRY_OF_ATTR
from optuna_rq.dispatch.views import INTERMEDIATE_VALUES_ATTR
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import StudyState, StudyStatus
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)

MODULE = ("tests.support.trial_objectives",)


def remote(objective: str, prefix: str, redis_url: str, **kwargs: object) -> Optimizer:
    return Optimizer(
        f"tests.support.trial_objectives:{objective}", redis_url=redis_url, prefix=prefix, **kwargs
    )  # type: ignore[arg-type]


def in_process(objective: str, n_trials: int, **kwargs: object) -> optuna.Study:
    from tests.support import trial_objectives

    study = optuna.create_study(**kwargs)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna's own warnings: clashes, deprecations
        study.optimize(getattr(trial_objectives, objective), n_trials=n_trials)
    return study


def complete(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    trials = study.trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * len(trials), [
        t.user_attrs.get(FAIL_ERROR_ATTR) for t in trials
    ]
    return trials


def test_single_objective_surface_reads_what_the_storage_holds(
    redis_url: str, workers_factory
) -> None:
    queue = workers_factory(count=1, modules=MODULE)
    study = optuna.create_study(pruner=optuna.pruners.MedianPruner(n_startup_trials=10))
    study.set_user_attr("owner", "me")
    remote("surface_single", queue, redis_url, concurrency=1, n_trials=2, study=study).run()
    first, second = complete(study)
    for trial in (first, second):
        seen = trial.user_attrs["seen"]
        assert seen["number"] == trial.number
        assert seen["params"] == {k: v for k, v in trial.params.items()}
        assert seen["distributions"] == sorted(trial.distributions)
        assert seen["x_high"] == 1  # the storage's distribution after the clash, not -5..5
        assert set(seen["user_attrs"]) == {"note"}
        assert seen["constraints"] == {"c0": pytest.approx(trial.params["x"] - 1.5)}
        assert trial.system_attrs["constraints:c0"] == pytest.approx(trial.params["x"] - 1.5)
        assert trial.system_attrs["sys"] == "yes"
        assert trial.user_attrs["note"] == {"k": [1, 2]}
        assert seen["started"] and seen["relative"] == []
        assert seen["directions"] == ["MINIMIZE"] and seen["direction"] == "MINIMIZE"
        assert seen["study_user_attrs"] == {"owner": "me"}
        assert sorted(trial.intermediate_values) == [0, 1, 2]
        i, j, c, s = seen["values"]
        assert i in (2, 4, 6, 8) and 1 <= j <= 64 and c in ("a", "b", None) and s in (0, 0.5, 1)
        assert trial.distributions["du"].step == 0.25 and trial.distributions["lu"].log
    assert first.user_attrs["seen"]["finished"] == [] and first.user_attrs["seen"]["best"] == (
        "ValueError"
    )
    assert second.user_attrs["seen"]["finished"] == [0]
    assert second.user_attrs["seen"]["best"] == "ok"
    assert second.user_attrs["seen"]["best_params"] == sorted(first.params)


def test_multi_objective_surface_and_reports(redis_url: str, workers_factory) -> None:
    queue = workers_factory(count=1, modules=MODULE)
    study = optuna.create_study(directions=["minimize", "minimize"])
    remote("surface_multi", queue, redis_url, concurrency=1, n_trials=2, study=study).run()
    first, second = complete(study)
    for trial in (first, second):
        x = trial.params["x"]
        expected = {str(s): [pytest.approx(x + s), pytest.approx(1 - x + s)] for s in range(3)}
        assert trial.user_attrs[INTERMEDIATE_VALUES_ATTR] == expected  # step 0 kept, not 9s
        seen = trial.user_attrs["seen"]
        assert seen["intermediate"] == expected
        assert set(seen["user_attrs"]) == {"mine", INTERMEDIATE_VALUES_ATTR}
        assert seen["system_attrs"] == trial.params["k"]
        assert seen["directions"] == ["MINIMIZE", "MINIMIZE"]
        assert seen["report_one"] == "NotImplementedError"
        assert seen["report_short"] == "ValueError"  # one value per objective
        assert seen["should_prune"] == "NotImplementedError"
        assert seen["best_trial"] == "RuntimeError" and seen["direction"] == "RuntimeError"
    assert first.user_attrs["seen"]["best_trials"] == []
    assert second.user_attrs["seen"]["best_trials"] == [0]
    assert second.user_attrs["seen"]["finished"] == [0]


@pytest.mark.parametrize(
    ("objective", "directions"),
    [("exceptions", ["minimize"]), ("exceptions_multi", ["minimize", "maximize"])],
)
def test_the_same_exceptions_as_in_process(
    redis_url: str, workers_factory, objective: str, directions: list[str]
) -> None:
    queue = workers_factory(count=1, modules=MODULE)
    study = optuna.create_study(directions=directions)
    remote(objective, queue, redis_url, concurrency=1, n_trials=1, study=study).run()
    [trial] = complete(study)
    [local] = in_process(objective, 1, directions=directions).trials
    assert trial.user_attrs["outcomes"] == local.user_attrs["outcomes"]
    assert "ok" in trial.user_attrs["outcomes"].values()
    assert len(set(trial.user_attrs["outcomes"].values())) >= 3  # ok and two kinds of error
    if objective == "exceptions":
        assert trial.user_attrs["after_clash"] == local.user_attrs["after_clash"] == ["x"]
        assert trial.intermediate_values == {0: 0.5}


def test_upload_artifact_from_a_worker_records_it_on_the_trial(
    redis_url: str, workers_factory, tmp_path: Path
) -> None:
    queue = workers_factory(count=1, modules=MODULE)
    opt = remote("artifact", queue, redis_url, concurrency=1, n_trials=2)
    opt.run(base=str(tmp_path))
    store = optuna.artifacts.FileSystemArtifactStore(str(tmp_path / "store"))
    for trial in complete(opt.study):
        [meta] = get_all_artifact_meta(trial, storage=opt.study._storage)
        assert meta.artifact_id == trial.user_attrs["artifact_id"]
        assert meta.filename == f"model-{trial.number}.txt" and meta.mimetype == "text/plain"
        with store.open_reader(meta.artifact_id) as f:
            assert f.read() == f"x={trial.params['x']}".encode()


def test_a_retry_reads_its_retry_attributes_from_the_storage(
    redis_url: str, workers_factory, tmp_path: Path
) -> None:
    queue = workers_factory(count=1, modules=MODULE)
    opt = remote("dies_once", queue, redis_url, concurrency=1, n_trials=1)
    opt.run(marker=str(tmp_path / "marker"))
    lost, retry = opt.study.trials
    assert lost.state is TrialState.FAIL and lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost"
    assert retry.state is TrialState.COMPLETE
    seen = retry.user_attrs["seen_user_attrs"]
    assert seen == {RETRY_OF_ATTR: lost.number, ATTEMPT_ATTR: 2}


def test_callbacks_are_called_after_every_tell_and_study_stop_ends_the_run(
    redis_url: str, workers_factory
) -> None:
    queue = workers_factory(count=2, modules=MODULE)
    seen: list[tuple[int, TrialState]] = []

    def record(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        assert study.trials[trial.number].state.is_finished()  # called after the tell
        seen.append((trial.number, trial.state))
        if len(seen) == 3:
            study.stop()

    opt = remote("plain", queue, redis_url, concurrency=2, n_trials=50, callbacks=[record])
    opt.run()
    trials = opt.study.trials
    assert TrialState.RUNNING not in [t.state for t in trials]
    assert len(trials) < 10  # stopped, not run to its budget
    assert sorted(n for n, _ in seen) == [t.number for t in trials]  # every tell, once
    complete_ = [t for t in trials if t.state is TrialState.COMPLETE]
    assert len(complete_) >= 3  # the ones running at stop() finished
    for t in trials:
        if t.state is TrialState.FAIL:  # sent, never started: withdrawn
            assert t.user_attrs[FAIL_REASON_ATTR] == "cancelled"


def test_max_trials_callback_works_remotely_and_in_process(redis_url: str, workers_factory) -> None:
    queue = workers_factory(count=1, modules=MODULE)
    stop_at_4 = optuna.study.MaxTrialsCallback(4, states=(TrialState.COMPLETE,))
    opt = remote("plain", queue, redis_url, concurrency=1, n_trials=20, callbacks=[stop_at_4])
    opt.run()
    # Exactly as in-process: nothing is asked before a slot frees, so nothing is left over.
    assert [t.state for t in opt.study.trials] == [TrialState.COMPLETE] * 4

    def local(trial: optuna.Trial) -> float:
        return trial.suggest_float("x", 0, 1)

    here = Optimizer(local, concurrency=1, n_trials=20, callbacks=[stop_at_4])
    here.run()
    assert len(here.study.trials) == 4


def test_a_callback_that_raises_ends_the_run_and_raises(redis_url: str, workers_factory) -> None:
    queue = workers_factory(count=1, modules=MODULE)

    def boom(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        raise KeyError("boom")

    opt = remote("plain", queue, redis_url, concurrency=1, n_trials=10, callbacks=[boom])
    with pytest.raises(KeyError, match="boom"):
        opt.run()
    assert TrialState.RUNNING not in [t.state for t in opt.study.trials]
    assert len(opt.study.trials) <= 2


def test_callbacks_must_be_callables() -> None:
    with pytest.raises(ValueError, match="callbacks must be callables"):
        Optimizer(lambda trial: 0.0, concurrency=1, n_trials=1, callbacks=[1])  # type: ignore[list-item]


# -- the daemon's stop conditions ---------------------------------------------------------------


def _status(run_cli, name: str) -> StudyStatus:
    out = run_cli("status", name, "--json")  # what a script reads
    assert out.returncode == 0, out.stderr
    return StudyStatus.from_json(out.stdout)


@pytest.mark.parametrize(
    ("options", "named"),
    [
        (["--target", "1e9"], "stopped by --target 1e+09: trial"),
        (["--patience", "2", "--sampler", "random"], "stopped by --patience 2"),
        (["--timeout", "1"], "stopped by --timeout 1"),
    ],
)
def test_a_stop_condition_ends_the_study_finished_and_names_itself(
    redis_url: str,
    prefix: str,
    workers_factory,
    broker_process,
    run_cli,
    options: list[str],
    named: str,
) -> None:
    workers_factory(count=2, modules=("tests.support.objectives",))
    # with x fixed, quadratic never improves on trial 0
    submitted = run_cli(
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        "x=2.0",
        "--n-trials",
        "5000",
        "--concurrency",
        "2",
        "--study-name",
        "stops",
        *options,
    )
    assert submitted.returncode == 0, submitted.stderr

    client = BrokerClient(connect(redis_url), prefix)

    def ended() -> bool:
        status = client.status("stops")
        return status is not None and status.state is StudyState.FINISHED

    wait_until(ended, timeout_s=120, interval_s=0.5, message="the study did not stop")
    status = _status(run_cli, "stops")
    assert status.stopped is not None and status.stopped.startswith(named), status
    assert status.error is None  # a success, not an error (tests/processes/test_stops.py)
    assert status.done < 5000 and status.running == 0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--timeout", "0"], "--timeout must be > 0"),
        (["--timeout", "1e12"], "--timeout must be > 0 and at most"),
        (["--target", "nan"], "--target must be a finite number"),
        (["--patience", "0"], "--patience must be an integer from 1"),
        (["--patience", "5", "--n-trials", "3"], "--patience must be an integer from 1"),
        (["--target", "1", "--direction", "minimize", "--direction", "maximize"], "single"),
    ],
)
def test_bad_stop_conditions_are_refused_at_submit(
    run_cli, options: list[str], message: str
) -> None:
    args = [
        "submit",
        "tests.support.objectives:quadratic",
        "--param",
        "x=1.0",
        "--concurrency",
        "1",
    ]
    if "--n-trials" not in options:
        args += ["--n-trials", "10"]
    out = run_cli(*args, *options)
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert message in out.stderr
