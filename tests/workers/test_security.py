"""Forgeries planted straight into Redis: no code runs, nothing is imported, workers serve on.

Each test plants one attack with the real RQ API or raw Redis commands on a queue served by real
worker processes, then checks that the marker file the attack would create is absent, that the
same worker processes are still registered, and that a real study on that queue still completes.
"""

from __future__ import annotations

import os
import pickle
import time
import zlib
from pathlib import Path

import pytest
import redis
from rq import Queue, Worker
from rq.job import JobStatus

from optuna_rq import Optimizer, suggest
from optuna_rq.protocol import (
    RESULT_FIELD,
    RUN_TRIAL,
    Keys,
    TrialRequest,
    TrialResult,
    trial_queue,
)
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(120)


class PlantsAMarker:
    """Unpickling this runs `touch <marker>`: what a pickle-trusting worker would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def served_queue(conn: redis.Redis, prefix: str) -> Queue:
    """The RQ queue the test's workers take trials of tests.support.objectives from."""
    return trial_queue(conn, Keys(prefix).trial_queue("tests.support.objectives"))


def worker_names(conn: redis.Redis, queue: str) -> set[str]:
    return {w.name for w in Worker.all(connection=conn, queue=served_queue(conn, queue))}


def assert_still_serving(conn: redis.Redis, queue: str, names: set[str], redis_url: str) -> None:
    assert worker_names(conn, queue) == names, "a worker died or was replaced"
    opt = Optimizer("tests.support.objectives:quadratic", 1, 3, redis_url=redis_url, prefix=queue)
    opt.run(x=suggest.float(0, 1))
    assert [t.state.name for t in opt.study.trials] == ["COMPLETE"] * 3


def wait_for_status(conn: redis.Redis, queue: str, job_id: str, status: JobStatus) -> None:
    job_queue = served_queue(conn, queue)
    wait_until(
        lambda: (
            (job := job_queue.fetch_job(job_id)) is None or job.get_status(refresh=True) == status
        ),
        timeout_s=30,
        message=f"job {job_id} never became {status}",
    )


@pytest.fixture
def served(workers_factory, conn: redis.Redis, redis_url: str) -> tuple[str, set[str]]:
    queue = workers_factory(count=1)
    return queue, worker_names(conn, queue)


@pytest.mark.parametrize(
    "func", ["os.system", "posix.system", "builtins.exec", "builtins.eval", "subprocess.getoutput"]
)
def test_a_job_naming_another_function_is_refused_before_any_import(
    served, conn: redis.Redis, redis_url: str, tmp_path: Path, func: str
) -> None:
    queue, names = served
    marker = tmp_path / "marker"
    job = served_queue(conn, queue).enqueue_call(func, args=(f"touch {marker}",))
    wait_for_status(conn, queue, job.id, JobStatus.FAILED)
    assert not marker.exists()
    assert "only trials run here" in (served_queue(conn, queue).fetch_job(job.id).exc_info or "")
    assert_still_serving(conn, queue, names, redis_url)


def test_a_pickled_job_is_never_unpickled(
    served, conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    """RQ's default serializer would run the payload on load; ours only reads msgpack."""
    queue, names = served
    marker = tmp_path / "marker"
    job = Queue(served_queue(conn, queue).name, connection=conn).enqueue_call(
        "builtins.print", args=("hi",)
    )  # pickle
    conn.hset(f"rq:job:{job.id}", "data", zlib.compress(pickle.dumps(PlantsAMarker(marker))))
    wait_for_status(conn, queue, job.id, JobStatus.FAILED)
    assert not marker.exists()
    assert_still_serving(conn, queue, names, redis_url)


def test_a_job_with_pickled_meta_is_never_unpickled(
    served, conn: redis.Redis, redis_url: str, tmp_path: Path
) -> None:
    queue, names = served
    marker = tmp_path / "marker"
    job = Queue(served_queue(conn, queue).name, connection=conn).enqueue_call(
        "builtins.print", args=("hi",)
    )
    conn.hset(f"rq:job:{job.id}", "meta", pickle.dumps(PlantsAMarker(marker)))
    # the worker may fail the job or drop it; either way nothing runs and the worker serves on
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and conn.lpos(f"rq:queue:{queue}", job.id) is not None:
        time.sleep(0.05)
    assert not marker.exists()
    assert_still_serving(conn, queue, names, redis_url)


def _plant_trial(conn: redis.Redis, queue: str, objective: str, reply_to: str) -> str:
    request = TrialRequest(
        study="forged",
        incarnation="0123456789ab",
        trial_number=0,
        attempt=1,
        objective=objective,
        params={"x": 1.0},
        n_objectives=1,
        reply_to=reply_to,
    )
    queue_ = served_queue(conn, queue)
    job_id = Keys.job_id(request.attempt_id)
    return queue_.enqueue_call(RUN_TRIAL, args=(request.encode(),), job_id=job_id).id


@pytest.mark.parametrize(
    "objective",
    [
        "tests.support.mark_on_import:objective",  # a module this worker does not serve
        "tests.support.objectives:os.system",  # an attribute path through a served module
        "tests.support.objectives:_private",
        "tests.support.objectives:imported_name",  # math.sqrt, imported into a served module
        "os:system",
    ],
)
def test_a_forged_trial_for_an_objective_not_served_fails_not_allowed(
    served, conn: redis.Redis, redis_url: str, prefix: str, objective: str
) -> None:
    queue, names = served
    reply_to = f"{prefix}:forged-results"
    _plant_trial(conn, queue, objective, reply_to)
    wait_until(lambda: conn.xlen(reply_to) == 1, timeout_s=30)
    [(_id, fields)] = conn.xrange(reply_to)
    result = TrialResult.decode(fields[RESULT_FIELD])
    assert (result.outcome.value, result.fail_reason.value) == ("FAIL", "not_allowed")
    assert_still_serving(conn, queue, names, redis_url)


@pytest.mark.processes
def test_the_unserved_module_is_never_imported(
    redis_url: str, conn: redis.Redis, prefix: str, tmp_path: Path
) -> None:
    """Workers whose environment makes `tests.support.mark_on_import` leave a mark when imported."""
    import subprocess

    from tests.support.worker_processes import cli, cli_env, stop_process

    mark = tmp_path / "imported"
    process = subprocess.Popen(
        cli(
            "--redis-url",
            redis_url,
            "--prefix",
            prefix,
            "workers",
            "--import",
            "tests.support.objectives",
        ),
        env=cli_env(OPTUNA_RQ_TEST_IMPORT_MARK=str(mark)),
    )
    try:
        wait_until(lambda: worker_names(conn, prefix), timeout_s=60)
        reply_to = f"{prefix}:forged-results"
        _plant_trial(conn, prefix, "tests.support.mark_on_import:objective", reply_to)
        wait_until(lambda: conn.xlen(reply_to) == 1, timeout_s=30)
        assert not mark.exists()
    finally:
        assert stop_process(process) == 0


@pytest.mark.parametrize(
    "payload",
    [b"", b"\xc1", pickle.dumps({"study": "s"}), b"\x81\xa1v\xd6\x01abcd", b"x" * 2_000_000],
    # Short ids: pytest puts the id in PYTEST_CURRENT_TEST, and a 2 MB one overflows the
    # environment of every process the test starts (older pytest does not shorten it).
    ids=["empty", "bad-byte", "pickle", "wrong-version", "2-MB"],
)
def test_a_payload_that_is_not_a_message_fails_the_job_without_a_result(
    served, conn: redis.Redis, redis_url: str, payload: bytes
) -> None:
    queue, names = served
    job = served_queue(conn, queue).enqueue_call(RUN_TRIAL, args=(payload,))
    wait_for_status(conn, queue, job.id, JobStatus.FAILED)
    assert "ProtocolError" in (served_queue(conn, queue).fetch_job(job.id).exc_info or "")
    assert_still_serving(conn, queue, names, redis_url)
