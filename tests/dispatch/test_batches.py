"""Batched trials (`StudySpec.batch`, `submit --batch N`): up to N trials of a study in one RQ job.

Real Redis and the real dispatcher; the jobs are read off the real queue and their results are
built as a worker builds them (`trial_result`). A batch's trials still end one at a time, each
freeing its slot; a broker that restarts finds the trials waiting in batches and sends none of
them again. The same with real workers and a real broker, killed mid-batch:
tests/processes/faults/test_batches.py.
"""

from __future__ import annotations

import time

import optuna
import pytest
import redis
from optuna.trial import TrialState

from optuna_rq import suggest
from optuna_rq.dispatch import Budget, Dispatcher, RunSpec, StudyRun
from optuna_rq.protocol import RESULT_FIELD, Keys, Outcome, Record, Role, Signer, TrialRequest
from optuna_rq.workers.execute import trial_result
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(60)

WORKER = Signer.from_env(Role.WORKER, {})


def a_run(
    study: optuna.Study, *, cap: int, batch: int, n_trials: int, incarnation: str | None = None
) -> StudyRun:
    return StudyRun(
        study=study,
        spec=RunSpec(
            objective="tests.support.objectives:quadratic",
            inputs={"x": suggest.float(0, 1)},
            concurrency=cap,
            batch=batch,
            **({} if incarnation is None else {"incarnation": incarnation}),
        ),
        budget=Budget(n_trials),
    )


def a_dispatcher(conn: redis.Redis, prefix: str) -> Dispatcher:
    return Dispatcher(conn, prefix=prefix, reply_to=f"{prefix}:results")


def queued_jobs(dispatcher: Dispatcher, run: StudyRun) -> dict[str, list[TrialRequest]]:
    """Each job waiting on the study's queue, by id, with the requests it carries."""
    queue = dispatcher.sender.queue(run)
    jobs = {}
    for job_id in queue.get_job_ids():
        job = queue.fetch_job(job_id)
        assert job is not None
        jobs[job_id] = [
            TrialRequest.decode(WORKER.open(Record.REQUEST, payload)) for payload in job.args
        ]
    return jobs


def report(conn: redis.Redis, request: TrialRequest) -> None:
    """What a worker sends when `request`'s trial completes."""
    result = trial_result(
        request, Outcome.COMPLETE, worker="w", started=time.monotonic(), values=[0.5]
    )
    conn.xadd(request.reply_to, {RESULT_FIELD: WORKER.seal(Record.RESULT, result.encode())})


def complete(run: StudyRun) -> int:
    return sum(t.state is TrialState.COMPLETE for t in run.study.trials)


def sizes(jobs: dict[str, list[TrialRequest]]) -> list[int]:
    return sorted(len(requests) for requests in jobs.values())


def test_a_study_sends_its_trials_in_jobs_of_at_most_its_batch(
    conn: redis.Redis, prefix: str
) -> None:
    dispatcher = a_dispatcher(conn, prefix)
    run = a_run(optuna.create_study(), cap=8, batch=3, n_trials=8)
    dispatcher.add(run)
    assert dispatcher.refill() == 8
    jobs = queued_jobs(dispatcher, run)
    assert sizes(jobs) == [2, 3, 3]
    for job_id, requests in jobs.items():
        # The job's id names every attempt it carries: a worker refuses it under another id.
        assert job_id == Keys.batch_job_id([r.attempt_id for r in requests])
    numbers = [r.trial_number for requests in jobs.values() for r in requests]
    assert sorted(numbers) == list(range(8))
    assert {record.job for record in run.in_flight()} == set(jobs)


def test_slots_freed_one_at_a_time_are_filled_once_a_whole_batch_is_free(
    conn: redis.Redis, prefix: str
) -> None:
    dispatcher = a_dispatcher(conn, prefix)
    run = a_run(optuna.create_study(), cap=4, batch=2, n_trials=7)
    dispatcher.add(run)
    assert dispatcher.refill() == 4
    first, second = (requests for requests in queued_jobs(dispatcher, run).values())
    report(conn, first[0])
    wait_until(lambda: dispatcher.poll(0.05), timeout_s=10)
    assert not dispatcher.behind  # one slot free: not a batch's worth, nothing to do
    assert dispatcher.refill() == 0
    report(conn, second[1])  # another job's trial: a batch's worth of slots is free
    wait_until(lambda: dispatcher.poll(0.05), timeout_s=10)
    assert dispatcher.behind
    assert dispatcher.refill() == 2
    jobs = list(queued_jobs(dispatcher, run).values())
    assert sizes(queued_jobs(dispatcher, run)) == [2, 2, 2]
    for request in [first[1], second[0], jobs[-1][0]]:
        report(conn, request)
    wait_until(lambda: dispatcher.poll(0.05) and complete(run) == 5, timeout_s=10)
    # One trial of the budget is left: it goes alone, not waiting for a second slot to free.
    assert dispatcher.refill() == 1
    assert run.budget.left == 0 and len(run.outstanding) == 2


def test_a_restarted_dispatcher_finds_the_trials_waiting_in_batches(
    conn: redis.Redis, prefix: str
) -> None:
    study = optuna.create_study()
    before = a_dispatcher(conn, prefix)
    first = a_run(study, cap=6, batch=3, n_trials=6)
    before.add(first)
    assert before.refill() == 6
    jobs = queued_jobs(before, first)

    # The broker stopped: another takes the study over from its storage (and its stored spec).
    after = a_dispatcher(conn, prefix)
    run = a_run(study, cap=6, batch=3, n_trials=6, incarnation=first.spec.incarnation)
    run.reattach()
    after.add(run)
    assert after.refill() == 0  # no trial sent again
    assert queued_jobs(after, run) == jobs
    assert {record.job for record in run.in_flight()} == set(jobs)


def test_cancelling_a_study_takes_its_queued_batches_back_whole(
    conn: redis.Redis, prefix: str
) -> None:
    dispatcher = a_dispatcher(conn, prefix)
    run = a_run(optuna.create_study(), cap=6, batch=3, n_trials=6)
    dispatcher.add(run)
    assert dispatcher.refill() == 6
    jobs = list(queued_jobs(dispatcher, run))
    dispatcher.cancel_outstanding()
    assert queued_jobs(dispatcher, run) == {}
    assert not any(conn.exists(f"rq:job:{job_id}") for job_id in jobs)
    assert [t.state for t in run.study.trials] == [TrialState.FAIL] * 6


def test_at_cap_1_a_batched_study_asks_as_an_unbatched_one(conn: redis.Redis, prefix: str) -> None:
    """A batch fills no more slots than the cap: at cap 1 each trial is asked when the one
    before it ended, so a seeded sampler gives `study.optimize`'s params."""
    dispatcher = a_dispatcher(conn, prefix)
    run = a_run(optuna.create_study(), cap=1, batch=4, n_trials=3)
    dispatcher.add(run)
    for number in range(3):
        assert dispatcher.refill() == 1
        [(request,)] = queued_jobs(dispatcher, run).values()
        assert request.trial_number == number
        conn.delete(*(f"rq:job:{j}" for j in queued_jobs(dispatcher, run)))
        conn.delete(dispatcher.sender.queue(run).key)  # taken by a worker, say
        report(conn, request)
        wait_until(lambda: dispatcher.poll(0.05), timeout_s=10)
