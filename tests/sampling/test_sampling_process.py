"""Sampling off the loop: a study whose sampler is slow samples in the broker's sampler process.
It samples there what it would in `study.optimize` (the sampler moves with its random state),
writes nothing there (the broker creates every trial), and a sampler process that dies costs no
trial: the loop samples again."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import optuna
import psutil
import pytest
from optuna.storages import JournalStorage
from optuna.trial import TrialState

from optuna_rq.sampling import SAMPLES_TO_DECIDE
from optuna_rq.sampling.journal_replica import JournalReader, ScratchStorage, ScratchWriteError
from optuna_rq.storage.storage_access import default_storage_url, open_storage
from tests.support import objectives
from tests.support.helpers import wait_until
from tests.support.worker_processes import start_broker, stop_process

pytestmark = [pytest.mark.timeout(180), pytest.mark.processes]

SEED = 42
N_TRIALS = SAMPLES_TO_DECIDE + 11  # some startup trials sampled there, then TPE's own asks


def _broker(redis_url: str, prefix: str, state: Path, log: Path) -> subprocess.Popen[bytes]:
    """A broker that moves every study it can off the loop (`--off-loop-above 0`) once the
    loop has timed its first trials; a warm-up study starts the sampler process."""
    process = start_broker(redis_url, prefix, state, "--off-loop-above", "0", stderr=log.open("wb"))
    return process


def _submit(run_cli, name: str, *args: str, sampler: str = "tpe") -> None:
    result = run_cli(
        "submit",
        "tests.support.objectives:quadratic",
        "--study-name",
        name,
        "--param",
        "x={type: float, low: -10, high: 10}",
        "--param",
        "depth={type: integer, low: 0, high: 3}",
        "--sampler",
        sampler,
        *args,
    )
    assert result.returncode == 0, result.stderr


def _warm_up(run_cli, log: Path) -> None:
    n = str(SAMPLES_TO_DECIDE)  # the loop decides on that many trials sampled
    _submit(run_cli, "warm-up", "--n-trials", n, "--concurrency", "3", "--wait")
    wait_until(
        lambda: "sampler process" in log.read_text() and "ready" in log.read_text(),
        timeout_s=60,
        message="the sampler process did not get ready",
    )


def _in_process_params() -> list[dict[str, object]]:
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=SEED))
    study.optimize(
        lambda t: objectives.quadratic(t.suggest_float("x", -10, 10), t.suggest_int("depth", 0, 3)),
        n_trials=N_TRIALS,
    )
    return [t.params for t in study.trials]


def test_a_seeded_study_sampled_off_the_loop_samples_what_study_optimize_samples(
    redis_url, prefix, cli_state, run_cli, workers_factory, tmp_path
) -> None:
    log = tmp_path / "broker.log"
    broker = _broker(redis_url, prefix, cli_state, log)
    try:
        workers_factory(count=2)
        _warm_up(run_cli, log)
        _submit(
            run_cli,
            "seeded",
            "--n-trials",
            str(N_TRIALS),
            "--concurrency",
            "1",
            "--seed",
            str(SEED),
            "--wait",
        )
    finally:
        assert stop_process(broker) == 0
    text = log.read_text()
    # Its first SAMPLES_TO_DECIDE trials are sampled on the loop (and timed there), then there.
    assert "study 'seeded' samples in the sampler process" in text, text
    study = optuna.load_study(
        study_name="seeded", storage=open_storage(default_storage_url(cli_state))
    )
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * N_TRIALS
    assert [t.params for t in study.trials] == _in_process_params()
    assert "Traceback" not in text, text  # the sampler process ended with the broker, quietly


def test_a_sampler_process_killed_mid_study_costs_no_trial(
    redis_url, prefix, cli_state, run_cli, workers_factory, tmp_path
) -> None:
    log = tmp_path / "broker.log"
    broker = _broker(redis_url, prefix, cli_state, log)
    storage = open_storage(default_storage_url(cli_state))
    try:
        workers_factory(count=3)
        _warm_up(run_cli, log)
        _submit(run_cli, "survives", "--n-trials", "60", "--concurrency", "3")

        def told() -> int:
            try:
                study = optuna.load_study(study_name="survives", storage=storage)
            except KeyError:
                return 0
            return sum(t.state.is_finished() for t in study.trials)

        # Killed once it samples there (its first SAMPLES_TO_DECIDE trials are timed on the
        # loop) and some trials sampled there have been told.
        moved = "study 'survives' samples in the sampler process"
        wait_until(lambda: moved in log.read_text(), timeout_s=60)
        wait_until(lambda: told() >= SAMPLES_TO_DECIDE + 3, timeout_s=60)
        (sampler,) = [  # (multiprocessing's resource tracker is a child too)
            p
            for p in psutil.Process(broker.pid).children()
            if "spawn_main" in " ".join(p.cmdline())
        ]
        sampler.send_signal(signal.SIGKILL)
        wait_until(lambda: "sampler process 0 is gone" in log.read_text(), timeout_s=30)
        result = run_cli("wait", "survives", timeout_s=120)
        assert result.returncode == 0, result.stdout + result.stderr
    finally:
        assert stop_process(broker) == 0
    study = optuna.load_study(study_name="survives", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 60


def test_a_fast_sampler_never_starts_the_sampler_process(
    redis_url, prefix, cli_state, run_cli, workers_factory, tmp_path
) -> None:
    """RandomSampler on the default threshold: its first ask is slow (set-up), every later one
    fast; the loop samples it, and no process is started for it."""
    log = tmp_path / "broker.log"
    broker = start_broker(redis_url, prefix, cli_state, stderr=log.open("wb"))
    try:
        workers_factory(count=2)
        fast = ("--n-trials", "40", "--concurrency", "2", "--wait")
        _submit(run_cli, "fast", *fast, sampler="random")
        children = [" ".join(p.cmdline()) for p in psutil.Process(broker.pid).children()]
    finally:
        assert stop_process(broker) == 0
    assert not [c for c in children if "spawn_main" in c], children
    assert "sampler process" not in log.read_text()


def test_a_sampler_process_the_broker_stops_while_it_starts_ends_quietly(redis_url) -> None:
    """The broker stops (a demo's study done) while its sampler process still imports: the
    process finds the pipe closed when it says it is ready, and ends without a traceback."""
    script = (
        "import sys\n"
        "from optuna_rq.sampling.sampler_process import SamplerProcess\n"
        "process = SamplerProcess(sys.argv[1], None, 'wake')\n"
        "process.start()\n"
        "process.stop()\n"  # at once: the child has not imported Optuna yet
    )
    result = subprocess.run(
        [sys.executable, "-c", script, redis_url], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_the_scratch_storage_writes_nothing_and_hides_enqueued_trials(tmp_path) -> None:
    path = tmp_path / "journal.log"
    writer = optuna.create_study(
        study_name="s",
        storage=JournalStorage(optuna.storages.journal.JournalFileBackend(str(path))),
    )
    for x in range(3):
        writer.add_trial(
            optuna.trial.create_trial(
                params={"x": float(x)},
                distributions={"x": optuna.distributions.FloatDistribution(0, 10)},
                value=float(x),
            )
        )
    writer.enqueue_trial({"x": 9.0})
    size = path.stat().st_size

    scratch = ScratchStorage(JournalStorage(JournalReader(path)))
    study = optuna.load_study(study_name="s", storage=scratch, sampler=optuna.samplers.TPESampler())
    trial = study.ask()
    x = trial.suggest_float("x", 0, 10)
    frozen = scratch.scratch_trial(scratch.last_created)
    assert (frozen.number, frozen.params, frozen.state) == (4, {"x": x}, TrialState.RUNNING)
    assert x != 9.0  # the enqueued trial is the broker's to take, in order
    assert path.stat().st_size == size  # nothing written: the broker creates the trial
    assert [t.number for t in study.get_trials(deepcopy=False)] == [0, 1, 2, 3, 4]
    with pytest.raises(ScratchWriteError):
        scratch.set_trial_user_attr(0, "k", 1)  # a trial the broker owns
    with pytest.raises(ScratchWriteError):
        study.tell(trial, 1.0)  # telling is the broker's too
    scratch.drop_scratch()
    assert [t.number for t in study.get_trials(deepcopy=False)] == [0, 1, 2, 3]
