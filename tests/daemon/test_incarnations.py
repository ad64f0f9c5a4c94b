"""Messages of another incarnation: the broker tells a result, and serves a call, only for the
incarnation of the study it runs; a remote trial takes only the answer to the call it made.

Real Redis, the real dispatcher and the real `RemoteTrial`; the other incarnation's messages are
what a worker of an earlier study of the same name would send (the killed-worker case with real
processes is tests/processes/faults/test_incarnations.py)."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import suggest
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.errors import RemoteTrialError
from optuna_rq.protocol import (
    RESULT_FIELD,
    AttemptId,
    Keys,
    Outcome,
    Record,
    Signer,
    TrialCall,
    TrialCallReply,
    TrialRequest,
    TrialResult,
    new_incarnation,
)
from optuna_rq.workers.remote_trial import RemoteTrial

pytestmark = pytest.mark.timeout(60)

signer = Signer(b"k" * 32)


@pytest.fixture
def sent(conn: redis.Redis, prefix: str) -> Iterator[tuple[Dispatcher, StudyRun]]:
    """A dispatcher whose study's trial 0 is sent (no worker takes it)."""
    dispatcher = Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results", signer=signer)
    run = StudyRun(
        study=optuna.create_study(),
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={"x": suggest.float(0, 1)},
            concurrency=1,
        ),
        budget=Budget(1),
    )
    dispatcher.add(run)
    dispatcher.refill()
    assert run.outstanding == {0: 1}
    yield dispatcher, run


@pytest.fixture
def serving(sent: tuple[Dispatcher, StudyRun]) -> Iterator[tuple[Dispatcher, StudyRun]]:
    """`sent`, its dispatcher serving calls from a thread."""
    dispatcher, _run = sent
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            dispatcher.poll(0.05)

    server = threading.Thread(target=serve)
    server.start()
    yield sent
    stop.set()
    server.join()


def request_for(run: StudyRun, prefix: str, incarnation: str) -> TrialRequest:
    request = TrialRequest(
        study=run.name,
        incarnation=incarnation,
        trial_number=0,
        attempt=1,
        objective=run.spec.objective,
        params={},
        n_objectives=1,
        reply_to=f"{prefix}:results",
    )
    return dataclasses.replace(request, token=token_of(request.attempt_id))


def token_of(attempt: AttemptId) -> str:
    """The token the dispatcher gave (or, of an earlier incarnation, would have given) the job
    of `attempt`: these messages are what its worker sends, not forgeries."""
    return signer.attempt_token(Keys.job_id(attempt))


def with_token(result: TrialResult, reply_to: str) -> TrialResult:
    attempt = AttemptId(
        reply_to=reply_to,
        study=result.study,
        incarnation=result.incarnation,
        trial_number=result.trial_number,
        attempt=result.attempt,
    )
    return dataclasses.replace(result, token=token_of(attempt))


def test_a_result_of_another_incarnation_is_dropped_not_told(
    conn: redis.Redis, prefix: str, sent: tuple[Dispatcher, StudyRun]
) -> None:
    dispatcher, run = sent
    result = TrialResult(
        study=run.name,
        incarnation=new_incarnation(),  # an earlier study of the same name, trial 0 attempt 1
        trial_number=0,
        attempt=1,
        outcome=Outcome.COMPLETE,
        values=[-1e9],
        fail_reason=None,
        error=None,
        worker="earlier",
        duration_s=0.0,
    )
    result = with_token(result, f"{prefix}:results")
    conn.xadd(f"{prefix}:results", {RESULT_FIELD: signer.seal(Record.RESULT, result.encode())})
    assert dispatcher.poll(0.1) == 0
    assert run.study.trials[0].state is TrialState.RUNNING
    assert dispatcher.dropped_results == 1

    ours = dataclasses.replace(result, incarnation=run.spec.incarnation, values=[0.5])
    ours = with_token(ours, f"{prefix}:results")
    conn.xadd(f"{prefix}:results", {RESULT_FIELD: signer.seal(Record.RESULT, ours.encode())})
    assert dispatcher.poll(0.1) == 1
    assert run.study.trials[0].value == 0.5


def test_a_call_of_another_incarnation_is_refused(
    conn: redis.Redis, prefix: str, serving: tuple[Dispatcher, StudyRun]
) -> None:
    _dispatcher, run = serving
    earlier = request_for(run, prefix, new_incarnation())
    with pytest.raises(RemoteTrialError, match="earlier study of that name"):
        RemoteTrial(conn, earlier, signer, keys=Keys(prefix)).suggest_float("y", 0, 1)
    assert "y" not in run.study.trials[0].params

    ours = request_for(run, prefix, run.spec.incarnation)
    y = RemoteTrial(conn, ours, signer, keys=Keys(prefix)).suggest_float("y", 0, 1)
    assert run.study.trials[0].params["y"] == y


def test_a_remote_trial_takes_only_the_answer_to_its_call(
    conn: redis.Redis, prefix: str, serving: tuple[Dispatcher, StudyRun], caplog, monkeypatch
) -> None:
    _dispatcher, run = serving
    monkeypatch.setattr(RemoteTrial, "_refused_logged", False)  # as in a fresh worker process
    request = request_for(run, prefix, run.spec.incarnation)
    own = Keys.reply_list(request.attempt_id)
    call = TrialCall(
        study=run.name,
        incarnation=run.spec.incarnation,
        trial_number=0,
        attempt=1,
        seq=1,
        method="suggest_float",
        args=["y", 0.0, 1.0],
        kwargs={},
        reply=True,
    )
    # On its own list before it asks: whatever a bug or a forger could leave there.
    strays = [
        dataclasses.replace(call, incarnation=new_incarnation()),  # an earlier study's
        dataclasses.replace(call, study=run.name + "-other"),  # another study's
        dataclasses.replace(call, attempt=2),  # another attempt's
        dataclasses.replace(call, trial_number=1),  # another trial's
        dataclasses.replace(call, seq=7),  # a call that timed out
    ]
    for stray in strays:
        reply = TrialCallReply.to(stray, ok=True, value=0.123, error=None)
        conn.rpush(own, signer.seal(Record.REPLY, reply.encode()))
    conn.rpush(own, b"not a reply")  # refused: it does not open
    trial = RemoteTrial(conn, request, signer, keys=Keys(prefix))
    with caplog.at_level("WARNING", logger="optuna_rq.worker"):
        y = trial.suggest_float("y", 0, 1)

    assert y == run.study.trials[0].params["y"] != 0.123  # the storage's, not a stray's
    assert trial.dropped_replies == len(strays) + 1
    assert int(conn.hget(Keys(prefix).dropped, "reply") or 0) == len(strays)
    assert int(conn.hget(Keys(prefix).refused, "reply") or 0) == 1
    said = [r.getMessage() for r in caplog.records if "waiting for its answers" in r.getMessage()]
    # Logged once each: the stale answers (once per trial), the refused reply (once per process)
    assert len(said) == 2 and "dropped a reply" in said[0] and "refused a reply" in said[1], said
    assert conn.llen(own) == 0


def test_the_broker_keeps_a_studys_incarnation_until_it_ends_or_is_deleted(
    conn: redis.Redis, prefix: str
) -> None:
    from optuna_rq.client import BrokerClient
    from optuna_rq.daemon import BrokerSettings, Daemon
    from optuna_rq.protocol import Delete, StudySpec, open_stored_spec

    daemon = Daemon(conn, BrokerSettings(prefix=prefix, storage="memory"), signer)
    client = BrokerClient(conn, prefix, signer=signer)
    spec = StudySpec(
        name="s",
        objective="tests.support.objectives:quadratic",
        space={},
        n_trials=1,
        concurrency=1,
    )

    def stored() -> str | None:
        raw = conn.hget(Keys(prefix).studies, "s")
        return None if raw is None else open_stored_spec(signer, "s", raw).incarnation

    daemon.acquire()
    try:
        client.submit(spec)
        daemon.step()
        first = stored()
        assert first is not None and daemon.dispatcher.runs["s"].spec.incarnation == first
        client.submit(spec.with_changes(n_trials=3))  # the same study, on
        daemon.step()
        assert stored() == first and daemon.dispatcher.runs["s"].spec.incarnation == first

        client.cancel("s")  # it ends: submitted again, it runs on as a new incarnation
        daemon.step()
        assert stored() == first and "s" not in daemon.dispatcher.runs
        client.submit(spec.with_changes(n_trials=4))
        daemon.step()
        again = stored()
        assert again not in (None, first) and daemon.dispatcher.runs["s"].spec.incarnation == again

        client.send(Delete(study="s", force=True, purge=True))
        daemon.step()
        assert stored() is None
        client.submit(spec)  # the same name, a new study
        daemon.step()
        second = stored()
        assert second not in (None, first, again)
        assert daemon.dispatcher.runs["s"].spec.incarnation == second
    finally:
        daemon.dispatcher.stop_sampling()
        daemon.release()
