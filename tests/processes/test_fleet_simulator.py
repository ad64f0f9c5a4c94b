"""The fleet simulator (benchmarks/fleet_simulator.py) drives a real broker as real workers do."""

from __future__ import annotations

import itertools
from pathlib import Path

import optuna
from optuna.storages.journal import JournalFileBackend, JournalStorage

from benchmarks.fleet_simulator import FleetSettings, SimulatedFleet
from optuna_rq.client import BrokerClient
from optuna_rq.plumbing.connection import connect
from optuna_rq.protocol import Keys, StudySpec, StudyState
from tests.support.helpers import wait_until
from tests.support.worker_processes import live_workers

WORKERS = 20
N_TRIALS = 40


def _most_at_once(trials: list[optuna.trial.FrozenTrial]) -> int:
    """The most trials RUNNING in the storage at one moment (asked, not yet told)."""
    events = sorted(
        itertools.chain.from_iterable(
            ((t.datetime_start, 1), (t.datetime_complete, -1))
            for t in trials
            if t.datetime_start is not None and t.datetime_complete is not None
        )
    )  # at one instant, a tell (-1) sorts before an ask (+1)
    return max(itertools.accumulate(step for _when, step in events))


def test_a_simulated_fleet_runs_a_study_on_a_real_broker_to_its_budget(
    redis_url: str, prefix: str, broker_process: object, cli_state: Path
) -> None:
    connection = connect(redis_url)
    settings = FleetSettings(
        redis_url=redis_url,
        prefix=prefix,
        module="benchmarks.objectives",
        workers=WORKERS,
        processes=2,
        trial_s=0.05,
    )
    client = BrokerClient(connection, prefix)
    # A cap of twice the fleet: only the broker counting the simulated workers live (its fair
    # share) holds the outstanding trials to the fleet's size.
    spec = StudySpec(
        name="fleet",
        objective="benchmarks.objectives:noop",
        space={"x": {"type": "float", "low": 0.0, "high": 1.0}},
        n_trials=N_TRIALS,
        concurrency=2 * WORKERS,
        sampler="random",
    )
    with SimulatedFleet(settings):
        assert live_workers(connection, prefix) == WORKERS
        # The broker reads the pools' heartbeats once a second, and each time rewrites the
        # demand hash (deleting it while it serves no study): once our mark is gone, its view
        # of the live workers dates from after the fleet's heartbeats.
        demand = Keys(prefix).demand
        connection.hset(demand, "mark", 1)
        wait_until(lambda: not connection.exists(demand), timeout_s=30, message="no refresh")
        client.submit(spec)

        def ended() -> bool:
            status = client.status(spec.name)
            return status is not None and status.state.ended

        wait_until(ended, timeout_s=90, message="the study did not end")
    status = client.require_status(spec.name)
    assert status.state is StudyState.FINISHED
    assert (status.complete, status.failed, status.retries) == (N_TRIALS, 0, 0)

    storage = JournalStorage(JournalFileBackend(str(cli_state / "studies.journal")))
    trials = optuna.load_study(study_name=spec.name, storage=storage).get_trials()
    states = [t.state for t in trials]
    assert states == [optuna.trial.TrialState.COMPLETE] * N_TRIALS
    # Each value is the wall-clock second its simulated run started: after its ask.
    assert all(t.value is not None and t.value >= t.datetime_start.timestamp() for t in trials)  # type: ignore[union-attr]
    # Counted live: never more outstanding than the simulated workers, though the cap allowed
    # twice as many (the broker asks only when a slot frees).
    assert _most_at_once(trials) <= WORKERS
