"""When the calls of a remote trial are acknowledged: with the answers they get, in one write;
a call that answers nothing (a `report`) with the dispatcher's next read, before it waits.

Real Redis and the real dispatcher, driven one poll at a time; the calls made as a worker's
`RemoteTrial` makes them, from the request taken off the real queue."""

from __future__ import annotations

import optuna
import pytest
import redis

from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.protocol import (
    CALL_FIELD,
    GROUP,
    Keys,
    Record,
    Signer,
    TrialCall,
    TrialCallReply,
    TrialMethod,
    TrialRequest,
)
from optuna_rq.workers.remote_trial import RemoteTrial

pytestmark = pytest.mark.timeout(60)


def _started(conn: redis.Redis, prefix: str) -> tuple[Dispatcher, StudyRun, TrialRequest]:
    dispatcher = Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results")
    run = StudyRun(
        study=optuna.create_study(),
        spec=RunSpec(objective="tests.support.trial_objectives:plain", inputs={}, concurrency=1),
        budget=Budget(1),
    )
    dispatcher.add(run)
    assert dispatcher.refill() == 1
    queue = dispatcher.sender.queue(run)
    [job_id] = queue.get_job_ids()
    job = queue.fetch_job(job_id)
    assert job is not None
    return dispatcher, run, TrialRequest.decode(Signer().open(Record.REQUEST, job.args[0]))


def _unacknowledged(conn: redis.Redis, request: TrialRequest) -> int:
    return int(conn.xpending(request.reply_to, GROUP)["pending"])  # type: ignore[index]


def test_reports_are_acknowledged_with_the_next_read_and_are_in_the_study_at_once(
    conn: redis.Redis, prefix: str
) -> None:
    dispatcher, run, request = _started(conn, prefix)
    trial = RemoteTrial(conn, request, Signer(), keys=Keys(prefix))
    trial.report(0.5, 0)
    trial.report(0.25, 1)
    trial.settle()
    assert dispatcher.poll(None) == 0
    [running] = run.study.trials
    assert running.intermediate_values == {0: 0.5, 1: 0.25}
    assert _unacknowledged(conn, request) == 2  # nothing asked back: no write of their own
    assert dispatcher.poll(0.05) == 0  # a read that found nothing new, then waited
    assert _unacknowledged(conn, request) == 0 and conn.xlen(request.reply_to) == 0


def test_an_answer_goes_out_with_the_acknowledgements_of_what_was_read(
    conn: redis.Redis, prefix: str
) -> None:
    dispatcher, _run, request = _started(conn, prefix)
    trial = RemoteTrial(conn, request, Signer(), keys=Keys(prefix))
    trial.report(0.5, 0)
    trial.settle()
    call = TrialCall(
        study=request.study,
        incarnation=request.incarnation,
        trial_number=request.trial_number,
        attempt=request.attempt,
        seq=2,
        method=TrialMethod.SHOULD_PRUNE,
        args=[],
        kwargs={},
        reply=True,
        token=request.token,
    )
    conn.xadd(request.reply_to, {CALL_FIELD: Signer().seal(Record.CALL, call.encode())})
    assert dispatcher.poll(None) == 0  # the report and the should_prune, in one read
    [raw] = conn.lrange(Keys.reply_list(request.attempt_id), 0, -1)  # type: ignore[misc]
    answer = TrialCallReply.decode(Signer().open(Record.REPLY, raw))
    assert answer.answers(call) and answer.ok and answer.value is False
    assert _unacknowledged(conn, request) == 0 and conn.xlen(request.reply_to) == 0
