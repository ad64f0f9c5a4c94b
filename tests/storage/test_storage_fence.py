"""A storage that writes through (SQL) is fenced at each write: a broker that lost its lock
makes nothing durable there, not even the trial an ask would create (a journal is fenced where
it becomes durable, at its flush: tests/processes/faults/test_fencing.py)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from optuna_rq.errors import FenceLostError
from optuna_rq.storage.guarded_storages import Storages
from optuna_rq.storage.storage_policy import StoragePolicy


def test_a_write_through_storage_writes_nothing_once_the_fence_is_lost(tmp_path: Path) -> None:
    holds = [True]

    def fence() -> None:
        if not holds[0]:
            raise FenceLostError("lost the broker lock: another broker took over")

    url = f"sqlite:///{tmp_path / 'studies.db'}"
    storages = Storages(policy=StoragePolicy(url), before_flush=fence)
    study = optuna.create_study(storage=storages.open(url), study_name="s")
    study.tell(study.ask(), 1.0)
    holds[0] = False
    with pytest.raises(FenceLostError):
        study.ask()
    with pytest.raises(FenceLostError):
        study.enqueue_trial({"x": 1.0})
    reread = optuna.load_study(study_name="s", storage=url)
    assert [t.state for t in reread.trials] == [optuna.trial.TrialState.COMPLETE]
    storages.close()
