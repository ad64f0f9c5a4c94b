"""A trial job whose values a worker cannot run as given (a timeout beyond what RQ's alarm and
Redis's EXPIRE take, as an older or hand-written enqueuer may send) fails its trial, saying why,
and the worker serves on: no crash loop, no `worker_lost`."""

from __future__ import annotations

import pytest
from rq import Worker

from optuna_rq.protocol import (
    RESULT_FIELD,
    RUN_TRIAL,
    FailReason,
    Keys,
    Outcome,
    Record,
    Signer,
    TrialRequest,
    TrialResult,
    trial_queue,
)
from tests.support.cluster import BOTH_ISOLATIONS, Cluster
from tests.support.helpers import wait_until

pytestmark = pytest.mark.timeout(180)


@BOTH_ISOLATIONS
@pytest.mark.parametrize("timeout", [10**12, 3_200_000_000])
def test_a_job_with_an_out_of_range_timeout_fails_its_trial_saying_why(
    cluster: Cluster, isolation: str, timeout: int
) -> None:
    # Given a worker pool
    cluster.start_workers(1, isolation)
    queue = trial_queue(
        cluster.conn, Keys(cluster.prefix).trial_queue("tests.support.fault_objectives")
    )
    workers = {w.name: w.pid for w in Worker.all(connection=cluster.conn, queue=queue)}
    reply_to = f"{cluster.prefix}:results"
    request = TrialRequest(
        study="s",
        incarnation="0123456789ab",
        trial_number=0,
        attempt=1,
        objective="tests.support.fault_objectives:steady",
        params={"x": 0.5, "redis_url": cluster.server.url, "key": cluster.key, "hold_s": 0.0},
        n_objectives=1,
        reply_to=reply_to,
    )

    # When a trial job comes with a timeout RQ cannot arm
    queue.enqueue_call(
        func=RUN_TRIAL,
        args=(Signer().seal(Record.REQUEST, request.encode()),),
        job_id=Keys.job_id(request.attempt_id),
        timeout=timeout,
    )

    # Then its trial fails, saying why, without running
    wait_until(lambda: cluster.conn.xlen(reply_to) >= 1, timeout_s=60, message="no result")
    [(_id, fields)] = cluster.conn.xrange(reply_to)
    result = TrialResult.decode(Signer().open(Record.RESULT, fields[RESULT_FIELD]))
    assert result.outcome is Outcome.FAIL and result.fail_reason is FailReason.EXCEPTION
    assert "out of range" in (result.error or "") and "2592000" in (result.error or ""), result
    assert cluster.samples() == []

    # And the same worker process serves on
    wait_until(lambda: queue.count == 0, timeout_s=30)
    after = {w.name: w.pid for w in Worker.all(connection=cluster.conn, queue=queue)}
    assert after == workers
    assert all(pool.poll() is None for pool in cluster.pools)
