"""`SystemExit` and `KeyboardInterrupt` raised by an objective are its error: the trial ends FAIL
(`exception`) naming it, at once, and a worker serves on; in-process the run stops, as
`study.optimize` stops. A real signal to the worker pool is no objective's error: the pool
still stops as it always did, and a worker's own cold shutdown still ends the process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import threading
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from optuna_rq import Optimizer
from optuna_rq.dispatch import ATTEMPT_ATTR, RETRY_OF_ATTR
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import error_headline
from optuna_rq.study.verdict import FAIL_ERROR_ATTR, FAIL_REASON_ATTR
from tests.support import result_objectives
from tests.support.helpers import wait_until
from tests.support.worker_processes import cli, cli_env, live_workers, stop_process

pytestmark = pytest.mark.timeout(120)

MODULE = ("tests.support.result_objectives",)

# What each objective raises, as its trial's error names it (its repr, as study.optimize logs).
RAISED = {
    "parses_arguments": "SystemExit(2)",
    "exits": "SystemExit('cannot train: no data')",
    "interrupted": "KeyboardInterrupt()",
}


def remote(objective: str, redis_url: str, prefix: str, **kwargs: object) -> Optimizer:
    return Optimizer(
        f"tests.support.result_objectives:{objective}",  # type: ignore[arg-type]
        redis_url=redis_url,
        prefix=prefix,
        **kwargs,  # type: ignore[arg-type]
    )


def assert_failed_naming(trial: optuna.trial.FrozenTrial, named: str) -> None:
    assert trial.state is TrialState.FAIL
    assert trial.user_attrs[FAIL_REASON_ATTR] == "exception", trial.user_attrs
    assert error_headline(trial.user_attrs[FAIL_ERROR_ATTR]) == f"{named} raised in the objective"


@pytest.mark.parametrize("isolation", ["process", "fork"])
def test_on_a_worker_the_trial_fails_naming_it_and_the_worker_serves_on(
    redis_url: str, workers_factory, isolation: str
) -> None:
    # A short lease: on a build where the worker swallowed them, each attempt would be lost
    # and retried, and this test would say so in seconds.
    prefix = workers_factory(
        count=1, modules=MODULE, args=("--isolation", isolation, "--lease-ttl", "1")
    )
    pids: set[int] = set()
    for objective, named in {**RAISED, "exits_async": "SystemExit(3)"}.items():
        study = optuna.create_study()
        remote(objective, redis_url, prefix, concurrency=1, n_trials=2, study=study).run()
        trials = study.trials
        assert len(trials) == 2, [t.user_attrs for t in trials]  # nothing retried
        for trial in trials:
            assert_failed_naming(trial, named)
            assert RETRY_OF_ATTR not in trial.user_attrs and ATTEMPT_ATTR not in trial.user_attrs
            pids.add(trial.user_attrs["pid"])
    study = optuna.create_study()
    remote("runs_on", redis_url, prefix, concurrency=1, n_trials=1, study=study).run()
    [after] = study.trials
    assert after.state is TrialState.COMPLETE
    if isolation == "process":  # one worker process ran every trial: none of them ended it
        assert pids | {after.user_attrs["pid"]} == {after.user_attrs["pid"]}


@pytest.mark.parametrize(("objective", "raised"), [(o, n) for o, n in RAISED.items()])
def test_in_process_the_trial_fails_naming_it_and_the_run_stops_as_study_optimize(
    objective: str, raised: str
) -> None:
    fn = getattr(result_objectives, objective)
    kind = KeyboardInterrupt if raised.startswith("KeyboardInterrupt") else SystemExit
    mine = optuna.create_study()
    with pytest.raises(kind):
        Optimizer(fn, concurrency=1, n_trials=3, study=mine).run()
    theirs = optuna.create_study()
    with pytest.raises(kind):
        theirs.optimize(fn, n_trials=3)
    [trial] = mine.trials  # the run stopped at the first, as study.optimize stops
    assert len(theirs.trials) == 1
    assert_failed_naming(trial, raised)


def test_in_process_the_trials_running_finish_and_no_new_one_starts() -> None:
    """As study.optimize(n_jobs=2) stops: the other running trial is told, then it raises."""
    other_started = asyncio.Event()

    async def objective(trial: optuna.Trial) -> float:
        if trial.number == 0:
            await other_started.wait()
            raise KeyboardInterrupt
        other_started.set()
        for _ in range(5):  # still running when trial 0 raises
            await asyncio.sleep(0)
        return 1.0

    study = optuna.create_study()
    with pytest.raises(KeyboardInterrupt):
        Optimizer(objective, concurrency=2, n_trials=6, study=study).run()
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert_failed_naming(study.trials[0], "KeyboardInterrupt()")


def _start_pool(redis_url: str, prefix: str, log: Path, *args: str) -> subprocess.Popen[bytes]:
    argv = ["--redis-url", redis_url, "--prefix", prefix, "workers", "--count", "1"]
    with log.open("wb") as out:
        pool = subprocess.Popen(cli(*argv, "--import", MODULE[0], *args), env=cli_env(), stderr=out)
    connection = connect(redis_url)
    try:
        wait_until(lambda: live_workers(connection, prefix) >= 1, timeout_s=60)
    finally:
        connection.close()
    return pool


def _run_in_thread(opt: Optimizer, **inputs: object) -> threading.Thread:
    thread = threading.Thread(target=opt.run, kwargs=inputs, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("isolation", ["process", "fork"])
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_to_the_pool_still_stops_it_after_the_running_trial(
    redis_url: str, prefix: str, tmp_path: Path, isolation: str, signum: signal.Signals
) -> None:
    log = tmp_path / "pool.log"
    pool = _start_pool(redis_url, prefix, log, "--isolation", isolation)
    try:
        release = tmp_path / "release"
        study = optuna.create_study()
        opt = remote("blocks", redis_url, prefix, concurrency=1, n_trials=1, study=study)
        running = _run_in_thread(opt, release=str(release))
        wait_until(Path(f"{release}.started").exists, timeout_s=60)
        pool.send_signal(signum)
        wait_until(lambda: b"warm shutdown" in log.read_bytes(), timeout_s=30)
        assert pool.poll() is None  # it waits for the running trial
        release.touch()
        running.join(timeout=60)
        assert not running.is_alive()
        assert pool.wait(timeout=60) == 0, log.read_text()
        [trial] = study.trials
        assert trial.state is TrialState.COMPLETE, trial.user_attrs  # the signal was no error
    finally:
        stop_process(pool)


def test_a_workers_cold_shutdown_inside_an_objective_is_no_error_of_the_objective(
    redis_url: str, prefix: str, tmp_path: Path
) -> None:
    """RQ's cold shutdown (a second SIGTERM to a worker process) raises SystemExit wherever the
    process is, inside the objective here: the process ends, and its attempt is lost and
    retried, never failed as if the objective had exited."""
    log = tmp_path / "pool.log"
    pool = _start_pool(redis_url, prefix, log, "--isolation", "process", "--lease-ttl", "1")
    try:
        release = tmp_path / "release"
        started = Path(f"{release}.started")
        study = optuna.create_study()
        opt = remote("blocks", redis_url, prefix, concurrency=1, n_trials=1, study=study)
        running = _run_in_thread(opt, release=str(release))
        wait_until(started.exists, timeout_s=60)
        child = int(started.read_text())
        started.unlink()
        os.kill(child, signal.SIGTERM)  # warm: after the running trial

        def cold_stopped() -> bool:
            """SIGTERM again until it is RQ's cold shutdown (RQ ignores a second signal within
            1 s of the first): SystemExit inside the objective, and the process ends."""
            try:
                os.kill(child, signal.SIGTERM)
            except ProcessLookupError:
                return True
            return False

        wait_until(cold_stopped, timeout_s=30, interval_s=0.25)
        wait_until(started.exists, timeout_s=60, message="the lost attempt was not retried")
        assert int(started.read_text()) != child  # on the worker process the pool restarted
        release.touch()
        running.join(timeout=60)
        assert not running.is_alive()
        lost, retry = study.trials
        assert lost.state is TrialState.FAIL
        assert lost.user_attrs[FAIL_REASON_ATTR] == "worker_lost", lost.user_attrs
        assert retry.state is TrialState.COMPLETE and retry.user_attrs[RETRY_OF_ATTR] == 0
    finally:
        stop_process(pool)
