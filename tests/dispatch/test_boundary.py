"""The fault boundary in-process: what passes through it, what it keeps, and the Dispatcher's
own caller (the remote Optimizer) learning what broke its study. The sites, one by one, with
real broker processes: tests/processes/faults/test_study_faults.py."""

from __future__ import annotations

import logging

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.dispatch.boundary import FaultBoundary, Site, passes_through
from optuna_rq.errors import (
    BrokerAlreadyRunningError,
    RedisDataLostError,
    StudyStorageError,
)

PROCESS_FAULTS = [
    redis.ConnectionError("Connection refused"),
    redis.TimeoutError("Timeout reading from socket"),
    redis.exceptions.BusyLoadingError("LOADING Redis is loading the dataset in memory"),
    redis.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'"),
    redis.exceptions.ReadOnlyError("READONLY You can't write against a read only replica."),
    redis.ResponseError("NOGROUP No such key 'p:results' or consumer group 'broker'"),
    BrokerAlreadyRunningError("lost the broker lock"),
    RedisDataLostError("Redis lost its data"),
    StudyStorageError("journal:///x", "storage journal:///x: OSError: No space left on device"),
    KeyboardInterrupt(),
    SystemExit(1),
]
STUDY_FAULTS = [
    ValueError("No feasible trials are completed yet."),
    KeyError("x"),
    RuntimeError("a sampler bug"),
    redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
]


@pytest.mark.parametrize("error", PROCESS_FAULTS, ids=lambda e: type(e).__name__)
def test_what_is_not_one_studys_passes_through(error: BaseException) -> None:
    boundary = FaultBoundary()
    assert passes_through(error)
    with pytest.raises(type(error)):
        with boundary.guard("s", Site.TELL):
            raise error
    assert not boundary.faulted("s")


@pytest.mark.parametrize("error", STUDY_FAULTS, ids=lambda e: type(e).__name__)
def test_a_studys_own_fault_is_kept_and_said_once(
    error: Exception, caplog: pytest.LogCaptureFixture
) -> None:
    boundary = FaultBoundary()
    ran_on = []
    for name in ("a", "b"):
        with boundary.guard(name, Site.ASK):
            if name == "a":
                raise error
            ran_on.append(name)
    with boundary.guard("a", Site.STATUS):
        raise RuntimeError("a second fault of the same study")
    assert ran_on == ["b"] and not boundary.faulted("b")
    fault = boundary.faults["a"]
    assert fault.site is Site.ASK and fault.cause is error
    assert str(fault) == f"{type(error).__name__}: {error} (while the broker did 'ask' for it)"
    records = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(records) == 1 and records[0].exc_info is not None


class _BrokenSampler(optuna.samplers.RandomSampler):
    """Breaks at `study.ask()` (a sampler raising in `process()` fails only that trial)."""

    def before_trial(self, study: optuna.Study, trial: object) -> None:
        raise RuntimeError("the sampler broke")


def test_run_until_done_raises_what_broke_its_study(conn: redis.Redis, prefix: str) -> None:
    study = optuna.create_study(sampler=_BrokenSampler())
    from optuna_rq import suggest

    run = StudyRun(
        study=study,
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={"x": suggest.float(-1, 1)},
            concurrency=2,
        ),
        budget=Budget(4),
    )
    dispatcher = Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results")
    dispatcher.add(run)
    try:
        with pytest.raises(RuntimeError, match="the sampler broke"):
            dispatcher.run_until_done(poll_s=0.05)
    finally:
        dispatcher.close()
    assert not dispatcher.runs and not dispatcher.boundary.faults
    states = {t.state for t in study.get_trials(deepcopy=False)}
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states


def test_a_purge_its_storage_cannot_do_is_refused_and_the_commands_after_it_apply(
    conn: redis.Redis, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`delete --purge` of a study whose storage is down is refused with the reason, not left
    at the head of the inbox to hold up every command after it."""
    from optuna_rq.client import BrokerClient
    from optuna_rq.daemon import BrokerSettings, Daemon
    from optuna_rq.protocol import Delete
    from optuna_rq.protocol.spec import StudySpec

    down = "journal:///dev/null/x.journal"  # a path that cannot be created
    settings = BrokerSettings(prefix=prefix, storage="memory", allowed_storages=(down,))
    daemon = Daemon(conn, settings)
    daemon.acquire()
    client = BrokerClient(conn, prefix)
    try:
        spec = StudySpec(
            name="down",
            objective="tests.support.objectives:quadratic",
            space={},
            n_trials=1,
            concurrency=1,
            storage=down,
        )
        client.submit(spec)
        daemon.step()
        assert client.status("down").state.value == "failed"  # type: ignore[union-attr]
        later = StudySpec(
            name="later",
            objective="tests.support.objectives:quadratic",
            space={},
            n_trials=1,
            concurrency=1,
        )
        client.send(Delete(study="down", force=False, purge=True))
        client.submit(later)
        daemon.step()
        assert conn.llen(f"{prefix}:commands") == 0
        assert "later" in daemon.specs and daemon.connection.hexists(f"{prefix}:studies", "down")
        assert any("was not deleted" in r.getMessage() for r in caplog.records)
    finally:
        daemon.release()
