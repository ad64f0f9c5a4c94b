"""The broker's journal file is durable before anything is acknowledged: a broker SIGKILLed
between a tell and its flush, or between a flush and what it acknowledges, loses nothing anyone
was told of; and Optuna's own readers read the file as the broker writes it."""

from __future__ import annotations

import collections
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from optuna.trial import FrozenTrial, TrialState

from optuna_rq.protocol import RESULT_FIELD, Keys, Record, Signer, TrialResult
from tests.support.cluster import Cluster
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(240)


def _pending_results(cluster: Cluster, name: str) -> set[int]:
    """Trial numbers of the study's results still in the stream: not acknowledged (an
    acknowledged result is deleted from it)."""
    signer = Signer()
    numbers = set()
    for _entry_id, fields in cluster.conn.xrange(Keys(cluster.prefix).results):
        raw = fields.get(RESULT_FIELD)
        if raw is not None:  # not a remote trial's call
            result = TrialResult.decode(
                signer.open(Record.RESULT, raw), max_bytes=signer.max_message_bytes
            )
            if result.study == name:
                numbers.add(result.trial_number)
    return numbers


def _quiet(cluster: Cluster) -> None:
    """Every trial a worker was running has ended and sent its result (no lease is left)."""
    results = Keys(cluster.prefix).results
    wait_until(
        lambda: not list(cluster.conn.scan_iter(match=f"{results}:lease:*")),
        timeout_s=60,
        message="the running trials did not end",
    )


def _values_are_the_objectives(trials: list[FrozenTrial]) -> None:
    for trial in trials:
        if trial.state is TrialState.COMPLETE:
            x = trial.params["x"]
            # `steady` returns x * x, which is not always x ** 2 to the last bit.
            assert trial.value == x * x, trial


@pytest.mark.parametrize(
    "failpoint",
    ["after_tell=1", "after_tell=4", "after_flush=5", "after_flush=9"],
    ids=["first-tell", "fourth-tell", "fifth-flush", "ninth-flush"],
)
def test_a_broker_killed_between_tell_and_flush_loses_nothing_acknowledged(
    cluster: Cluster, failpoint: str
) -> None:
    cluster.start_workers(3)
    first = cluster.start_broker(failpoints=failpoint)
    name = cluster.submit("steady", n_trials=12, concurrency=3, hold_s=0.2)
    assert first.wait(timeout=90) == -signal.SIGKILL
    published = cluster.status(name)
    _quiet(cluster)

    # What the dead broker left: every trial a worker ran was in the journal before it was sent;
    # every result acknowledged (gone from the stream) is told there, with its value (a trial
    # that ran and is not told has its result waiting); and the last status published says no
    # more than the journal holds.
    trials = cluster.trials(name)
    called = set(cluster.calls())
    assert called <= {repr(t.params["x"]) for t in trials}, (called, trials)
    pending = _pending_results(cluster, name)
    ran_untold = {
        t.number
        for t in trials
        if t.state is not TrialState.COMPLETE and repr(t.params["x"]) in called
    }
    assert ran_untold <= pending, (ran_untold, pending)
    _values_are_the_objectives(trials)
    complete = sum(t.state is TrialState.COMPLETE for t in trials)
    assert published.get("complete", 0) <= complete, (published, complete)

    # And a restarted broker tells the rest: exactly the budget, each trial run once and told
    # once, none retried (a result acknowledged and then lost would show as a lost worker).
    cluster.start_broker()
    trials = cluster.check(name, complete=12, cap=3, failed=0)
    _values_are_the_objectives(trials)
    calls = cluster.calls()
    assert len(calls) == 12 and set(calls.values()) == {1}, calls
    assert len(trials) == 12


def _view(trials: list[FrozenTrial]) -> list[tuple[Any, ...]]:
    return [(t.number, t.state, t.values, t.params) for t in trials]


def test_optunas_own_reader_reads_the_journal_while_the_broker_writes_it(cluster: Cluster) -> None:
    cluster.start_workers(2)
    broker = cluster.start_broker()
    name = cluster.submit("steady", n_trials=40, concurrency=2, hold_s=0.02)

    # While it runs: a fresh JournalStorage on the file reads it whole, and holds at least what
    # the broker's status says.
    seen = collections.Counter[str]()

    def read_while_running() -> bool:
        status = cluster.status(name)
        if status.get("state") not in ("running", "finished"):
            return False
        trials = cluster.trials(name)
        _values_are_the_objectives(trials)
        complete = sum(t.state is TrialState.COMPLETE for t in trials)
        assert complete >= status.get("complete", 0), (complete, status)
        seen["midway" if 0 < complete < 40 else "other"] += 1
        return status["state"] == "finished"

    wait_until(read_while_running, timeout_s=120, interval_s=0.01)
    assert seen["midway"] > 0, seen

    # Finished: the file holds the study the status describes.
    status = cluster.status(name)
    running = cluster.trials(name)
    assert [t.state for t in running] == [TrialState.COMPLETE] * 40
    best = min(running, key=lambda t: t.value or 0.0)
    assert (best.value, best.params) == (status["best_value"], status["best_params"])

    # Stopped: the same trials, read by Optuna's reader and by the `optuna` CLI.
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(timeout=30) == 0
    assert _view(cluster.trials(name)) == _view(running)
    listed = subprocess.run(
        [str(Path(sys.executable).parent / "optuna"), "trials"]
        + ["--storage", str(cluster.journal())]
        + ["--storage-class", "JournalFileBackend", "--study-name", name, "-f", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert sorted((r["number"], r["value"], r["state"]) for r in rows) == [
        (t.number, t.value, "COMPLETE") for t in running
    ]


_NOTEBOOK = """
import sys
import time
import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend

study = optuna.create_study(
    study_name="notebook", storage=JournalStorage(JournalFileBackend(sys.argv[1]))
)
def objective(trial):
    time.sleep(0.05)
    return trial.suggest_float("x", 0, 1) ** 2


study.optimize(objective, n_trials=int(sys.argv[2]))
"""


def test_a_users_own_optuna_process_writes_the_brokers_journal_beside_it(
    cluster: Cluster,
) -> None:
    # Two front doors on one file: the broker runs its study while a user's process (a
    # notebook, say) runs another with Optuna's own JournalFileBackend on the broker's journal.
    cluster.start_workers(2)
    cluster.start_broker()
    name = cluster.submit("steady", n_trials=30, concurrency=2, hold_s=0.3)
    wait_until(lambda: cluster.status(name).get("complete", 0) >= 1, timeout_s=60)
    notebook = subprocess.run(
        [sys.executable, "-c", _NOTEBOOK, str(cluster.journal()), "30"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert notebook.returncode == 0, notebook.stderr

    cluster.check(name, complete=30, cap=2, failed=0)
    # A fresh reader of the file sees both studies whole, the broker's as its status says.
    mine = cluster.trials("notebook")
    assert [t.state for t in mine] == [TrialState.COMPLETE] * 30
    assert all(t.value == t.params["x"] ** 2 for t in mine)
    theirs = cluster.trials(name)
    _values_are_the_objectives(theirs)
    # They wrote at the same time: the notebook's trials ran while the broker's study did.
    assert max(t.datetime_complete for t in mine) < max(t.datetime_complete for t in theirs)  # type: ignore[type-var]
