"""Results and trial calls are bound to the attempt's token: a worker key signs results for any
attempt, so the broker tells a result, and serves a call, only with the token the dispatcher put
in that attempt's job (`Signer.attempt_token` of its job id), which only the worker given the
job holds.

Real Redis and the real dispatcher, signed with role keys; the results and calls are built as a
worker builds them (`trial_result`, `RemoteTrial`) from the requests taken off the real queue.
The same with real processes end to end: tests/processes/faults/test_role_keys.py.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import suggest
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.protocol import (
    CALL_FIELD,
    RESULT_FIELD,
    FailReason,
    Keys,
    Outcome,
    Record,
    Role,
    Signer,
    TrialCall,
    TrialRequest,
    generate_keyrings,
)
from optuna_rq.workers.execute import trial_result
from optuna_rq.workers.remote_trial import RemoteTrial
from optuna_rq.workers.running_attempt import Attempt

pytestmark = pytest.mark.timeout(60)

RINGS = generate_keyrings()
BROKER, WORKER = (Signer(keyring=RINGS[role]) for role in (Role.BROKER, Role.WORKER))


@pytest.fixture
def sent(conn: redis.Redis, prefix: str) -> Iterator[tuple[Dispatcher, StudyRun]]:
    """A broker-key dispatcher whose study's trials 0 and 1 wait in the queue (no worker)."""
    dispatcher = Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results", signer=BROKER)
    run = StudyRun(
        study=optuna.create_study(),
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={"x": suggest.float(0, 1)},
            concurrency=2,
        ),
        budget=Budget(2),
    )
    dispatcher.add(run)
    for _ in range(10):
        dispatcher.refill()
        if len(run.outstanding) == 2:
            break
    assert len(run.outstanding) == 2
    yield dispatcher, run


def taken(dispatcher: Dispatcher, run: StudyRun) -> list[TrialRequest]:
    """The requests a worker takes off the study's queue, opened with the worker key."""
    queue = dispatcher.sender.queue(run)
    requests = []
    for job_id in queue.get_job_ids():
        job = queue.fetch_job(job_id)
        assert job is not None
        (payload,) = job.args
        requests.append(TrialRequest.decode(WORKER.open(Record.REQUEST, payload)))
    return sorted(requests, key=lambda r: r.trial_number)


def refused(conn: redis.Redis, prefix: str) -> dict[str, int]:
    stored: dict[bytes, bytes] = conn.hgetall(Keys(prefix).refused)  # type: ignore[assignment]
    return {k.decode(): int(v) for k, v in stored.items()}


def test_a_result_is_told_only_with_the_token_of_its_attempts_job(
    conn: redis.Redis, prefix: str, sent: tuple[Dispatcher, StudyRun]
) -> None:
    dispatcher, run = sent
    mine, other = taken(dispatcher, run)
    assert len(mine.token) == 32 and mine.token != other.token
    assert mine.token == BROKER.attempt_token(Keys.job_id(mine.attempt_id))

    result = trial_result(
        mine, Outcome.COMPLETE, worker="w", started=time.monotonic(), values=[0.5]
    )
    assert result.token == mine.token  # a worker gives back what its request carried
    forged = [
        dataclasses.replace(result, token=""),  # none
        dataclasses.replace(result, token="0" * 32),  # made up
        dataclasses.replace(result, token=other.token),  # a worker given another job
    ]
    for each in forged:  # each validly signed with the worker key
        conn.xadd(f"{prefix}:results", {RESULT_FIELD: WORKER.seal(Record.RESULT, each.encode())})
    assert dispatcher.poll(0.1) == 0
    assert [t.state for t in run.study.trials] == [TrialState.RUNNING] * 2
    assert refused(conn, prefix) == {"result token": 3}
    assert dispatcher.refused_results == 3

    conn.xadd(f"{prefix}:results", {RESULT_FIELD: WORKER.seal(Record.RESULT, result.encode())})
    assert dispatcher.poll(0.1) == 1
    assert run.study.trials[mine.trial_number].value == 0.5


def test_the_supervisors_result_for_a_killed_trial_carries_the_token(
    sent: tuple[Dispatcher, StudyRun],
) -> None:
    dispatcher, run = sent
    mine, _other = taken(dispatcher, run)
    attempt = Attempt.of(mine, job_id="j", lease="l", holder="h", timeout_s=1.0)
    assert attempt.failed(FailReason.TIMEOUT, "killed past its timeout").token == mine.token


def test_a_trial_call_is_served_only_with_the_token_of_its_attempts_job(
    conn: redis.Redis, prefix: str, sent: tuple[Dispatcher, StudyRun]
) -> None:
    dispatcher, run = sent
    mine, other = taken(dispatcher, run)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            dispatcher.poll(0.05)

    server = threading.Thread(target=serve)
    server.start()
    try:
        forged = TrialCall(
            study=mine.study,
            incarnation=mine.incarnation,
            trial_number=mine.trial_number,
            attempt=mine.attempt,
            seq=1,
            method="suggest_float",
            args=["y", 0.0, 1.0],
            kwargs={},
            reply=True,
            token=other.token,  # a worker given another job
        )
        conn.xadd(f"{prefix}:results", {CALL_FIELD: WORKER.seal(Record.CALL, forged.encode())})
        trial = RemoteTrial(conn, mine, WORKER, keys=Keys(prefix))  # the real proxy
        y = trial.suggest_float("z", 0, 1)
    finally:
        stop.set()
        server.join()
    params = run.study.trials[mine.trial_number].params
    assert params == {"x": params["x"], "z": y}  # the forged call suggested nothing
    assert trial.dropped_replies == 0  # nor was it answered on the attempt's reply list
    assert refused(conn, prefix) == {"call token": 1}
