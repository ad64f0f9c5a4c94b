"""More than one sampler process (`SamplerPool`, `optuna-rq broker --sampler-processes`): a study
whose sampler cannot keep up with its workers samples in a second process, with a reseeded copy
of its sampler; a study at cap 1 keeps to the process its sampler went to first (it samples what
`study.optimize` samples); one process killed costs no trial.

The real dispatcher and real sampler processes (spawned, as the broker's), the trials run by
inline workers; the sampler sleeps, so the processes' CPU is not what holds them up.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import redis
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from optuna_rq import suggest
from optuna_rq.dispatch import Budget, Dispatcher, OffLoopSampling, RunSpec, StudyRun
from optuna_rq.sampling.sampler_pool import SamplerPool
from tests.support.helpers import wait_until
from tests.support.inline_workers import InlineWorkers
from tests.support.slow_samplers import SlowRandomSampler

pytestmark = [pytest.mark.timeout(180), pytest.mark.processes]

ROUNDS = 2  # each process-level scenario, run again from scratch


def a_study(tmp_path: Path, name: str, sampler: optuna.samplers.BaseSampler) -> optuna.Study:
    storage = JournalStorage(JournalFileBackend(str(tmp_path / "journal.log")))
    return optuna.create_study(study_name=name, storage=storage, sampler=sampler)


def a_run(study: optuna.Study, tmp_path: Path, *, cap: int, n_trials: int) -> StudyRun:
    return StudyRun(
        study=study,
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={"x": suggest.float(-10, 10)},
            concurrency=cap,
        ),
        budget=Budget(n_trials),
        journal=str(tmp_path / "journal.log"),
    )


def a_dispatcher(
    conn: redis.Redis, redis_url: str, prefix: str, *, most: int
) -> tuple[Dispatcher, SamplerPool]:
    wake = f"{prefix}:wake"
    pool = SamplerPool(redis_url, None, wake, most=most)
    # Every study moves off the loop once timed (above 0 s); the pool grows once studies are
    # held up for half of a 0.2 s window.
    off_loop = OffLoopSampling(pool, above_s=0.0, grow_window_s=0.2)
    dispatcher = Dispatcher(
        conn, prefix=prefix, reply_to=f"{prefix}:results", off_loop=off_loop, wake=wake
    )
    return dispatcher, pool


def started(pool: SamplerPool) -> None:
    """Start its first process, and wait until it is ready (its word read)."""
    pool.start()
    wait_until(lambda: not pool.replies() and bool(pool.ready), timeout_s=60)


def turns(dispatcher: Dispatcher, until: Callable[[], bool], timeout_s: float = 60) -> None:
    """Turn the dispatch loop (as `run_until_done` does) in this thread until `until()`."""
    deadline = time.monotonic() + timeout_s
    while not until():
        assert time.monotonic() < deadline, "the dispatcher never got there"
        dispatcher.refill()
        dispatcher.poll(None if dispatcher.behind else 0.05)


def run_in_thread(dispatcher: Dispatcher) -> tuple[threading.Thread, threading.Event, list]:
    stop, errors = threading.Event(), []

    def loop() -> None:
        try:
            dispatcher.run_until_done(stop=stop, poll_s=0.05)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return thread, stop, errors


def assert_each_trial_ended_once(study: optuna.Study, n_trials: int) -> None:
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials] == [TrialState.COMPLETE] * n_trials
    assert sorted(t.number for t in trials) == list(range(n_trials))


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_a_study_its_process_cannot_keep_up_with_samples_in_a_second_one_with_a_reseeded_copy(
    conn, redis_url, prefix, inline_workers: InlineWorkers, tmp_path, round_
) -> None:
    inline_workers.start(count=4)
    dispatcher, pool = a_dispatcher(conn, redis_url, prefix, most=2)
    n_trials = 300  # the loop samples the first ones while the first process starts
    study = a_study(tmp_path, "held-up", SlowRandomSampler(seed=7, delay_s=0.02))
    run = a_run(study, tmp_path, cap=24, n_trials=n_trials)
    dispatcher.add(run)
    try:
        dispatcher.run_until_done(poll_s=0.05, give_up_after_s=120)
    finally:
        dispatcher.stop_sampling()
    assert_each_trial_ended_once(study, n_trials)
    assert len(pool.processes) == 2  # grown once, to its most, and no further
    assert dispatcher.off_loop.sampled[0] > 0 and dispatcher.off_loop.sampled[1] > 0
    # The second process's copy was reseeded: a copy of the first's random state would draw
    # the same numbers again.
    xs = [t.params["x"] for t in study.trials]
    assert len(set(xs)) == n_trials
    # The loop never asks its own (stale) copy of the sampler for a trial sampled there: its
    # relative params came back with its params.
    assert study.sampler.relative_asks == n_trials - sum(dispatcher.off_loop.sampled.values())


def test_a_fast_enough_sampler_never_grows_the_pool(
    conn, redis_url, prefix, inline_workers: InlineWorkers, tmp_path
) -> None:
    """Two trials ending together hold a study up for one ask: no reason for a process."""
    inline_workers.start(count=2)
    dispatcher, pool = a_dispatcher(conn, redis_url, prefix, most=2)
    started(pool)  # the study moves as soon as it was timed
    study = a_study(tmp_path, "keeps-up", SlowRandomSampler(seed=7, delay_s=0.001))
    dispatcher.add(a_run(study, tmp_path, cap=2, n_trials=120))
    try:
        dispatcher.run_until_done(poll_s=0.05, give_up_after_s=120)
    finally:
        dispatcher.stop_sampling()
    assert_each_trial_ended_once(study, 120)
    assert dispatcher.off_loop.sampled[0] > 100
    assert len(pool.processes) == 1


def test_a_study_at_cap_1_keeps_to_its_first_process_and_samples_what_study_optimize_samples(
    conn, redis_url, prefix, inline_workers: InlineWorkers, tmp_path
) -> None:
    """Its sampler went to the first process, as the loop left it, random state and all. A
    second process started later is idle while the first samples another study (slowly): a
    request sent there would take a reseeded copy, and sample otherwise."""
    inline_workers.start(count=2)
    dispatcher, pool = a_dispatcher(conn, redis_url, prefix, most=2)
    started(pool)
    runs = []
    for name, seed, delay_s in [("other", 1, 0.05), ("seeded", 3, 0.002)]:
        (tmp_path / name).mkdir()
        study = a_study(tmp_path / name, name, SlowRandomSampler(seed=seed, delay_s=delay_s))
        runs.append(a_run(study, tmp_path / name, cap=1, n_trials=40))
        dispatcher.add(runs[-1])
    try:
        turns(dispatcher, until=lambda: all(map(dispatcher.off_loop.samples_off_loop, runs)))
        assert pool.grow()  # a study at cap 1 never grows the pool: it is grown here
        dispatcher.run_until_done(poll_s=0.05, give_up_after_s=150)
    finally:
        dispatcher.stop_sampling()
    assert len(pool.processes) == 2 and dispatcher.off_loop.sampled[1] == 0
    seeded = runs[1].study
    assert_each_trial_ended_once(seeded, 40)
    alone = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    alone.optimize(lambda t: t.suggest_float("x", -10, 10), n_trials=40)
    assert [t.params for t in seeded.trials] == [t.params for t in alone.trials]


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_one_of_two_processes_killed_costs_no_trial(
    conn, redis_url, prefix, inline_workers: InlineWorkers, tmp_path, round_
) -> None:
    inline_workers.start(count=4)
    dispatcher, pool = a_dispatcher(conn, redis_url, prefix, most=2)
    n_trials = 200
    study = a_study(tmp_path, "survives", SlowRandomSampler(seed=7, delay_s=0.02))
    dispatcher.add(a_run(study, tmp_path, cap=24, n_trials=n_trials))
    thread, stop, errors = run_in_thread(dispatcher)
    try:
        wait_until(
            lambda: dispatcher.off_loop.sampled[1] > 0 or not thread.is_alive(),
            timeout_s=90,
            message="the second process sampled nothing",
        )
        second = pool.processes[1].pid
        assert second is not None
        os.kill(second, signal.SIGKILL)
        wait_until(lambda: dispatcher.off_loop.pool is None or not thread.is_alive(), timeout_s=30)
        thread.join(timeout=150)
    finally:
        stop.set()
        thread.join(timeout=30)
        dispatcher.stop_sampling()
    assert not errors, errors
    assert_each_trial_ended_once(study, n_trials)
    # Every process stopped with it: the loop sampled the rest.
    assert all(not process.started for process in pool.processes)
